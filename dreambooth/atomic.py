"""Atomic file writes: a crash or cancel leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import TrainingError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How libraries word a full disk when they do not raise OSError (safetensors' Rust writer, for one).
DISK_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "storagefull")
# Below this much free space a failed write is taken as "disk full": torch.save then only says "unexpected pos".
LOW_SPACE_BYTES = 1 << 20
TEMP_SUFFIX = ".tmp"


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before any worker threads exist.
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files as 0600; written files should get the same mode as any other new file.
_FILE_MODE = 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success fsync it and rename it over `target`.

    The temporary file lives in the same folder so the final rename never crosses file systems
    (rename is only atomic within one). On any exception the temporary file is removed and the
    previous `target` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _FILE_MODE)
    try:
        yield tmp
        # Some writers (safetensors) replace the file we created with one of their own, mode 0600.
        os.chmod(tmp, _FILE_MODE)
        _fsync_file(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException as error:
        # Judge "disk full" before the temporary file goes: removing it frees the space again.
        full = isinstance(error, Exception) and is_disk_full(error, target.parent)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if full:
            raise disk_full(target) from error
        raise


def _is_enospc(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def free_bytes(folder: str | os.PathLike[str]) -> int | None:
    """Free space on the drive holding `folder` (its nearest existing parent), None when unknown."""
    path = Path(folder)
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(error: BaseException, folder: str | os.PathLike[str] | None = None) -> bool:
    """Whether `error` (or what caused it) means the disk filled up.

    With `folder`, a failed write while that drive has (almost) no space left counts too, since some
    writers report a full disk only as a short write.
    """
    for cause in _causes(error):
        if _is_enospc(cause) or any(text in str(cause).lower() for text in DISK_FULL_TEXTS):
            return True
    if folder is None:
        return False
    free = free_bytes(folder)
    return free is not None and free < LOW_SPACE_BYTES


def disk_full(path: str | os.PathLike[str]) -> OSError:
    """The OSError every writer here raises for a full disk: ENOSPC, naming the file it was writing."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def disk_full_error(error: BaseException, folder: str | os.PathLike[str]) -> TrainingError:
    """A one-line TrainingError for a full disk, naming where the write failed and what to do."""
    where = next((c.filename for c in _causes(error) if isinstance(c, OSError) and c.filename), None) or folder
    return TrainingError(f"Disk full while writing {where}: free space on that drive (or move the folder to "
                         "another drive) and start again; files saved before are intact and training resumes "
                         "from the last snapshot.")


@contextlib.contextmanager
def disk_full_guard(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a full disk met while writing into `folder` into the one-line TrainingError above."""
    try:
        yield
    except TrainingError:
        raise
    except Exception as error:
        if is_disk_full(error, folder):
            raise disk_full_error(error, folder) from error
        raise


def is_temporary_name(name: str) -> bool:
    """A leftover of an interrupted atomic write: `.NAME.RANDOM.tmp` files and `.NAME.tmp-RANDOM` folders."""
    return name.startswith(".") and (name.endswith(TEMP_SUFFIX) or f"{TEMP_SUFFIX}-" in name)


def remove_stale_temps(folder: str | os.PathLike[str], prefix: str = "", recursive: bool = False) -> list[Path]:
    """Delete the temporary files and folders a crash left in `folder` (named `.{prefix}...`); return them.

    Only call this where no other writer can be at work (e.g. a model's own folder when its run starts):
    a running writer's temporary file looks the same.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    candidates = root.rglob(".*") if recursive else root.glob(".*")
    stale = [p for p in candidates if is_temporary_name(p.name) and p.name.startswith(f".{prefix}")]
    removed = []
    for path in sorted(stale, key=lambda p: len(p.parts)):
        if not path.exists():
            continue  # inside a stale folder removed just before
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_path(path: Path) -> None:
    """Flush a file or folder entry to disk (folders make renames durable; Windows cannot open them)."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder`, then the folder itself (before renaming it into place)."""
    for path in [*folder.rglob("*"), folder]:
        fsync_path(path)


def write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike[str], text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_safetensors(tensors: dict[str, Any], target: str | os.PathLike[str],
                     metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
