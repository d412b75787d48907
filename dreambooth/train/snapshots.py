"""Resumable training state and output files.

A snapshot is `snapshots/step-N/` holding the trained tensors (`trained.safetensors`), the optimizer, LR
scheduler, EMA, GradScaler and RNG states as tensors (`training_state.safetensors`) plus their structure
(`training_state.json`, see statetree.py), and `state.json` (run id, the run's settings, step, epoch,
batch index, seed). Nothing is pickled, so reading a snapshot runs no code; a snapshot of an older version
(`training_state.pt`, a pickle) is refused, never loaded. A snapshot is written into a temporary folder and
renamed into place, so a crash leaves the previous snapshot intact. Only trainable tensors are stored,
which keeps LoRA snapshots small.

Snapshots belong to a run: each start either resumes the newest snapshot's run or begins a new run with a
new id. A run is resumed only when it is unfinished and its training settings (config.schema.run_settings)
are unchanged; changing only its length (max steps or epochs) extends or shortens it. Pruning keeps the
newest `keep` snapshots of the current run; other runs' snapshots are deleted once the current run has
written one of its own, so a new run that dies before its first snapshot never loses the old ones.

Outputs: full models are saved to working/ (save_components) and exported as a single file to the host's
checkpoint folder; LoRAs are exported to the host's LoRA folder. Names are `<model>_<step>` and made unique.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import fsync_path, fsync_tree, write_json
from ..config.schema import RUN_LENGTH_SETTINGS
from ..errors import TrainingError
from . import statetree

STATE_FILE = "state.json"
TENSORS_FILE = "trained.safetensors"
OBJECTS_TENSORS_FILE = "training_state.safetensors"
OBJECTS_STRUCTURE_FILE = "training_state.json"
LEGACY_OBJECTS_FILE = "training_state.pt"  # a pickle, written before snapshots were tensors plus JSON


# --- random generators ----------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (statetree stores them without pickle)."""
    name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(), "python": random.getstate(),
        "numpy": (str(name), torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)), int(position),
                  int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing --------------------------------------------------------------------------------------------

def snapshot_path(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def write_snapshot(root: Path, step: int, tensors: dict[str, torch.Tensor], objects: dict[str, Any],
                   meta: dict[str, Any], keep: int = 1) -> Path:
    """Write a snapshot atomically (temp folder + rename), then prune (see prune_snapshots).

    `meta` should hold the run's "run_id" and "settings"; it is stored in state.json with the step and a
    sequence number that orders snapshots by when they were written (step numbers restart with each run).
    """
    root.mkdir(parents=True, exist_ok=True)
    target = snapshot_path(root, step)
    tmp = root / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    sequence = 1 + max((_sequence(p) for p in list_snapshots(root)), default=0)
    tmp.mkdir()
    try:
        _write_files(tmp, tensors, objects, {**meta, "step": step, "sequence": sequence})
        # Never a moment without a complete snapshot of this step: the old one is moved aside first and
        # only deleted after the new one is in place (list_snapshots puts a moved-aside one back).
        aside = _aside_path(target)
        if target.exists():
            os.replace(target, aside)
        os.replace(tmp, target)
        fsync_path(root)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_snapshots(root, keep, meta.get("run_id"))
    return target


def _write_files(folder: Path, tensors: dict[str, torch.Tensor], objects: dict[str, Any],
                 meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state_tensors, structure = statetree.flatten(objects)
    save_file({k: _owned(v) for k, v in tensors.items()}, str(folder / TENSORS_FILE))
    save_file({k: _owned(v) for k, v in state_tensors.items()}, str(folder / OBJECTS_TENSORS_FILE))
    write_json(folder / OBJECTS_STRUCTURE_FILE, {"format": statetree.FORMAT_VERSION, "objects": structure})
    write_json(folder / STATE_FILE, meta)
    fsync_tree(folder)


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with storage of its own: safetensors refuses tensors that share memory (views)."""
    tensor = tensor.detach().cpu()
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor.contiguous() if whole and tensor.storage_offset() == 0 else tensor.clone()


def _aside_path(target: Path) -> Path:
    return target.with_name(f".old-{target.name}")


def _restore_aside(root: Path) -> None:
    """A crash between moving a snapshot aside and renaming its replacement in: put the old one back."""
    for aside in root.glob(".old-step-*"):
        target = root / aside.name[len(".old-"):]
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, target)


# --- listing and pruning --------------------------------------------------------------------------------

def list_snapshots(root: Path) -> list[Path]:
    """Complete snapshots, oldest first (in the order they were written)."""
    if not root.is_dir():
        return []
    _restore_aside(root)
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: (_sequence(p), p.name))


def _sequence(path: Path) -> int:
    try:
        return int(read_meta(path).get("sequence", 0))
    except (OSError, ValueError, TypeError):
        return 0  # unreadable state.json: oldest, so it is never chosen over a good one


def run_of(path: Path) -> str | None:
    try:
        return read_meta(path).get("run_id")
    except (OSError, ValueError):
        return None


def prune_snapshots(root: Path, keep: int, run_id: str | None = None) -> None:
    """Keep the newest `keep` snapshots of run `run_id`; delete other runs' once this run has one."""
    found = list_snapshots(root)
    own = [p for p in found if run_id is None or run_of(p) == run_id]
    others = [p for p in found if p not in own] if own else []
    for old in own[:-max(1, keep)] + others:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_of_run(root: Path, run_id: str) -> Path | None:
    own = [p for p in list_snapshots(root) if run_of(p) == run_id]
    return own[-1] if own else None


# --- reading --------------------------------------------------------------------------------------------

def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def mark_finished(path: Path) -> None:
    """A finished run's snapshot is kept for inspection but not resumed from."""
    write_json(path / STATE_FILE, {**read_meta(path), "finished": True})


def mark_run_finished(root: Path, step: int, run_id: str) -> Path | None:
    """Mark run `run_id`'s snapshot of `step` finished; None when this run has no snapshot of that step."""
    path = snapshot_path(root, step)
    if not (path / STATE_FILE).is_file() or run_of(path) != run_id:
        return None
    mark_finished(path)
    return path


def is_legacy(path: Path) -> bool:
    return (path / LEGACY_OBJECTS_FILE).exists() or not (path / OBJECTS_STRUCTURE_FILE).is_file()


def legacy_message(path: Path) -> str:
    return (f"Snapshot {path} was written by an older version with a format that can run code; it is not "
            "loaded: delete it or start without resume.")


def read_snapshot(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trained tensors, training objects, state.json) of a snapshot; nothing in it can run code."""
    if is_legacy(path):
        raise TrainingError(legacy_message(path))
    try:
        document = json.loads((path / OBJECTS_STRUCTURE_FILE).read_text(encoding="utf-8"))
        objects = statetree.unflatten(_read_tensors(path / OBJECTS_TENSORS_FILE), document["objects"])
        return _read_tensors(path / TENSORS_FILE), objects, read_meta(path)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise TrainingError(f"Snapshot {path} cannot be read ({type(error).__name__}: {error}); delete it or "
                            "start without resume.") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Each tensor in an allocation of its own, aligned and writable like one the run made itself, rather
    than a view at some byte offset of the file's mapping (optimizer states are updated in place)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {key: handle.get_tensor(key).clone() for key in handle.keys()}  # noqa: SIM118 - not a dict


# --- which snapshot a start resumes ---------------------------------------------------------------------

@dataclass
class ResumeDecision:
    """What a start does: resume `path` (run `run_id`) or, with path None, begin run `run_id`; `message` says why."""

    path: Path | None
    run_id: str
    message: str
    meta: dict[str, Any] = field(default_factory=dict)
    settings_changed: bool = False  # an unfinished run is not resumed because its settings changed


def fresh_run(reason: str = "", settings_changed: bool = False) -> ResumeDecision:
    run_id = new_run_id()
    return ResumeDecision(None, run_id, f"{reason}Starting run {run_id}.", settings_changed=settings_changed)


def resumable_snapshot(root: Path, settings: dict[str, Any]) -> ResumeDecision:
    """Resume the newest snapshot if its run is unfinished and was trained with the same `settings`
    (config.schema.run_settings); else a new run, with a message naming what was found and why."""
    found = list_snapshots(root)
    if not found:
        return fresh_run()
    latest = found[-1]
    try:
        meta = read_meta(latest)
    except (OSError, ValueError) as error:
        raise TrainingError(f"Snapshot {latest} cannot be read ({STATE_FILE}: {type(error).__name__}); delete it "
                            "or start without resume.") from None
    run, step = meta.get("run_id") or "from an older version", meta.get("step", "?")
    if meta.get("finished"):
        return fresh_run(f"Run {run} finished at step {step}; it is not resumed. ")
    if is_legacy(latest):
        raise TrainingError(legacy_message(latest))
    changed = changed_settings(meta.get("settings") or {}, settings)
    length = [name for name in changed if name in RUN_LENGTH_SETTINGS]
    if len(changed) > len(length):
        names = ", ".join(name for name in changed if name not in RUN_LENGTH_SETTINGS)
        return fresh_run(f"Run {run} stopped at step {step} was trained with other settings ({names}); it is "
                         f"not resumed and its snapshot {latest.name} is deleted once the new run saves one "
                         "(set them back to resume it). ", settings_changed=True)
    extended = "".join(f"; {name} changed from {meta['settings'].get(name)} to {settings.get(name)}"
                       for name in length)
    message = f"Resuming run {run} from step {step} (snapshot {latest.name}){extended}."
    return ResumeDecision(latest, str(meta.get("run_id") or new_run_id()), message, meta)


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(name for name in old.keys() | new.keys() if old.get(name, _MISSING) != new.get(name, _MISSING))


_MISSING = object()


def prune_outputs(paths: list[Path], keep: int) -> list[Path]:
    """Delete the oldest intermediate outputs beyond `keep` (0: keep all); return those still kept."""
    if keep <= 0 or len(paths) <= keep:
        return paths
    for old in paths[:-keep]:
        old.unlink(missing_ok=True)
    return paths[-keep:]
