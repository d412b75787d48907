"""One writer per model across processes: `<model>/.train.lock` names the process that trains or exports it.

The lock file holds the holder's pid, host, process start time and purpose as JSON. Taking it is serialised by
an OS file lock on `.train.lock.guard` (held only for the check-and-write, released by the OS even after
SIGKILL), so two starts cannot both see the model free. A lock whose process is gone on this host, or whose
pid now belongs to a process started at another time (pid reuse), is stale: it is cleared with a message. A
lock from another host cannot be checked and is honoured; its message says how to clear it.

Under `accelerate launch` only the main process (rank 0) takes the lock; the other ranks never write the
model folder and would otherwise refuse their own run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import DreamboothError

log = logging.getLogger(__name__)

LOCK_FILE = ".train.lock"
GUARD_FILE = ".train.lock.guard"
GUARD_TIMEOUT_S = 30.0
# The verb of each purpose, for "Model 'X' is already <verb> in process N".
PURPOSES = {"train": "training", "export": "being exported", "export_lora": "being exported",
            "class_images": "generating class images"}


class ModelBusy(DreamboothError):
    """Another process (or run) holds the model's writer lock; the API answers 409."""


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    started_at: float  # when the lock was taken (wall clock)
    process_start: float | None  # the holder process's start time, to tell a reused pid apart
    purpose: str

    def describe(self, model_name: str) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        verb = PURPOSES.get(self.purpose, f"in use ({self.purpose})")
        return f"Model '{model_name}' is already {verb} in process {self.pid} (host {self.host}) since {when}"


def process_start_time(pid: int) -> float | None:
    """The start time of process `pid` (seconds since the epoch), None when there is no such process."""
    import psutil  # a dependency of accelerate: always present where training runs

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped: gone for our purposes
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def this_process() -> LockHolder:
    pid = os.getpid()
    return LockHolder(pid, socket.gethostname(), time.time(), process_start_time(pid), "")


def is_main_rank() -> bool:
    """True outside distributed runs and on rank 0 of an `accelerate launch`/torchrun group."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def read_holder(lock_path: Path) -> LockHolder | None:
    """The holder recorded in `lock_path`; None when there is no file; raises ValueError when unreadable."""
    try:
        data = json.loads(lock_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(str(error)) from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    try:
        return LockHolder(int(data["pid"]), str(data["host"]), float(data["started_at"]),
                          None if data.get("process_start") is None else float(data["process_start"]),
                          str(data.get("purpose", "train")))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"missing or bad field {error}") from None


def stale_reason(holder: LockHolder) -> str | None:
    """Why `holder` no longer holds the lock, or None when it may still (a live process, or another host)."""
    if holder.host != socket.gethostname():
        return None
    started = process_start_time(holder.pid)
    if started is None:
        return f"process {holder.pid} is gone"
    if holder.process_start is not None and abs(started - holder.process_start) > 1.0:
        return f"process {holder.pid} is now another program (started at another time)"
    return None


@contextmanager
def _guard(root: Path) -> Iterator[None]:
    from filelock import FileLock, Timeout  # a dependency of huggingface_hub: always present

    try:
        with FileLock(str(root / GUARD_FILE), timeout=GUARD_TIMEOUT_S):
            yield
    except Timeout:
        raise ModelBusy(f"Could not check the lock of model '{root.name}' within {GUARD_TIMEOUT_S:.0f} s "
                        f"({root / GUARD_FILE} stays locked); try again.") from None


def live_holder(root: Path, warn: Callable[[str], None] | None = None) -> LockHolder | None:
    """The process holding model folder `root`, or None; a stale lock is removed (said through `warn`)."""
    lock_path = root / LOCK_FILE
    try:
        holder = read_holder(lock_path)
    except ValueError as error:
        reason, holder = f"the lock file is unreadable ({error})", None
    else:
        if holder is None:
            return None
        reason = stale_reason(holder)
        if reason is None:
            return holder
    lock_path.unlink(missing_ok=True)
    (warn or log.warning)(f"Cleared a stale lock of model '{root.name}': {reason} (a crashed or killed run).")
    return None


def check_free(root: Path) -> None:
    """Raise ModelBusy when a live process holds model folder `root` (a quick check before starting work).

    A stale lock is left for `writer_lock` to clear, so its message reaches the run that takes over.
    """
    try:
        holder = read_holder(root / LOCK_FILE)
    except ValueError:
        return
    if holder is not None and stale_reason(holder) is None:
        raise ModelBusy(_busy_message(root, holder))


def _busy_message(root: Path, holder: LockHolder) -> str:
    advice = "wait for it to finish or stop it first"
    if holder.host != socket.gethostname():
        advice += f"; if that process is gone, delete {root / LOCK_FILE}"
    return f"{holder.describe(root.name)}; {advice}."


def _write_holder(lock_path: Path, holder: LockHolder) -> None:
    # O_EXCL: never replaces a file another writer might have made; the guard makes this the only writer.
    descriptor = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(asdict(holder), handle)
        handle.flush()
        os.fsync(handle.fileno())


def _release(root: Path, mine: LockHolder) -> None:
    with _guard(root):
        try:
            current = read_holder(root / LOCK_FILE)
        except ValueError:
            current = None
        if current is not None and (current.pid, current.host, current.started_at) == (
                mine.pid, mine.host, mine.started_at):
            (root / LOCK_FILE).unlink(missing_ok=True)


@contextmanager
def writer_lock(root: Path, purpose: str, warn: Callable[[str], None] | None = None,
                enabled: bool | None = None) -> Iterator[LockHolder | None]:
    """Hold model folder `root` for `purpose` ("train", "export") for the block; raise ModelBusy when taken.

    `enabled` defaults to "this is the main rank": other ranks of a distributed run take no lock.
    """
    if not (is_main_rank() if enabled is None else enabled):
        yield None
        return
    with _guard(root):
        holder = live_holder(root, warn)
        if holder is not None:
            raise ModelBusy(_busy_message(root, holder))
        mine = LockHolder(**{**asdict(this_process()), "purpose": purpose})
        _write_holder(root / LOCK_FILE, mine)
    try:
        yield mine
    finally:
        _release(root, mine)
