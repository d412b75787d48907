"""Resumable training state and output files.

A snapshot is `snapshots/step-N/` holding the trained tensors (safetensors), the optimizer, LR scheduler,
EMA and RNG states (torch.save) and `state.json` (step, epoch, batch index, seed). It is written into a
temporary folder and renamed into place, so a crash leaves the previous snapshot intact. Only trainable
tensors are stored, which keeps LoRA snapshots small.

Outputs: full models are saved to working/ (save_components) and exported as a single file to the host's
checkpoint folder; LoRAs are exported to the host's LoRA folder. Names are `<model>_<step>` and made unique.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import fsync_path, fsync_tree, write_json

STATE_FILE = "state.json"
TENSORS_FILE = "trained.safetensors"
OBJECTS_FILE = "training_state.pt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def snapshot_path(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def write_snapshot(root: Path, step: int, tensors: dict[str, torch.Tensor], objects: dict[str, Any],
                   meta: dict[str, Any], keep: int = 1) -> Path:
    """Write a snapshot atomically (temp folder + rename), then delete all but the newest `keep`."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    target = snapshot_path(root, step)
    tmp = root / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
        torch.save(objects, tmp / OBJECTS_FILE)
        write_json(tmp / STATE_FILE, {**meta, "step": step})
        fsync_tree(tmp)
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
    prune_snapshots(root, keep)
    return target


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


def list_snapshots(root: Path) -> list[Path]:
    """Complete snapshots, oldest first."""
    if not root.is_dir():
        return []
    _restore_aside(root)
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune_snapshots(root: Path, keep: int) -> None:
    for old in list_snapshots(root)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def mark_finished(path: Path) -> None:
    """A finished run's snapshot is kept for inspection but not resumed from."""
    write_json(path / STATE_FILE, {**read_meta(path), "finished": True})


def resumable_snapshot(root: Path) -> Path | None:
    snapshots = list_snapshots(root)
    if not snapshots or read_meta(snapshots[-1]).get("finished"):
        return None
    return snapshots[-1]


def read_snapshot(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    objects = torch.load(path / OBJECTS_FILE, map_location="cpu", weights_only=False)
    return load_file(str(path / TENSORS_FILE)), objects, read_meta(path)


def prune_outputs(paths: list[Path], keep: int) -> list[Path]:
    """Delete the oldest intermediate outputs beyond `keep` (0: keep all); return those still kept."""
    if keep <= 0 or len(paths) <= keep:
        return paths
    for old in paths[:-keep]:
        old.unlink(missing_ok=True)
    return paths[-keep:]
