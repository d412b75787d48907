"""What a run writes and reads back: snapshots (resumable state), saved models, sample images.

Every call into `snapshots` is here, so a change of the snapshot format is one place. Files are written by
rank 0 only; the other ranks wait where rank 0 writes, so every rank leaves a save at the same step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import atomic
from ..config.schema import training_resolutions
from . import runtime, snapshots, textcache
from .optim import set_training_mode
from .sampling import render_samples, sample_prompts

if TYPE_CHECKING:
    from ..store import ModelDir
    from .session import Session


@dataclass
class State:
    """Where the loop is: the next step to run, its epoch and the batch group within the epoch."""

    step: int = 0
    epoch: int = 0
    group: int = 0
    nan_skips: int = 0


def resume_point(model_dir: ModelDir, settings: dict[str, Any], resume: bool) -> snapshots.ResumeDecision:
    """Which run a start is: the unfinished run with the same training settings, continued from its newest
    snapshot, or a new run (the decision's message says which and why)."""
    if not resume:
        return snapshots.fresh_run("Not resuming (asked to start fresh). ")
    return snapshots.resumable_snapshot(model_dir.snapshots, settings)


class Checkpointer:
    def __init__(self, session: Session):
        self.session = session
        self.saved: list[Path] = []         # every file or folder this run wrote as output
        self.intermediate: list[Path] = []  # the intermediate exports still kept ('save_keep_last')

    # --- snapshots -----------------------------------------------------------------------------------

    def snapshot(self, state: State, finished: bool = False) -> Path | None:
        s = self.session
        if not s.ranks.is_main:
            return None
        objects = {"optimizer": s.optimizer.state_dict(), "scheduler": s.lr_scheduler.state_dict(),
                   "ema": s.ema.state_dict() if s.ema else None, "rng": snapshots.rng_state(),
                   "scaler": s.scaler.state_dict() if s.scaler else None}
        meta = {"run_id": s.run_id, "settings": s.run_settings, "epoch": state.epoch, "group": state.group,
                "seed": s.seed, "nan_skips": state.nan_skips, "total_steps": s.run.total_steps, "finished": finished}
        with atomic.disk_full_guard(s.model_dir.snapshots):
            path = snapshots.write_snapshot(s.model_dir.snapshots, state.step, s.trained_tensors(), objects, meta)
        s.callbacks.on_saved("snapshot", path)
        return path

    def mark_finished(self, state: State) -> Path | None:
        """Mark the run's last snapshot finished; rewriting it would leave a moment with no snapshot at all."""
        s = self.session
        marked = snapshots.mark_run_finished(s.model_dir.snapshots, state.step, s.run_id) if s.ranks.is_main else None
        return marked or self.snapshot(state, finished=True)

    def latest_snapshot(self) -> Path | None:
        """This run's newest snapshot (another run's never counts as this one's)."""
        return snapshots.latest_of_run(self.session.model_dir.snapshots, self.session.run_id)

    def restore(self, path: Path) -> State:
        s = self.session
        tensors, objects, meta = snapshots.read_snapshot(path)
        with torch.no_grad():
            for group, module in s.named_modules().items():
                for name, param in module.named_parameters():
                    key = f"{group}.{name}"
                    if key in tensors:
                        param.copy_(tensors[key].to(param.dtype))
        s.optimizer.load_state_dict(objects["optimizer"])
        s.lr_scheduler.load_state_dict(objects["scheduler"])
        if s.ema is not None and objects.get("ema"):
            s.ema.load_state_dict(objects["ema"])
        if s.scaler is not None and objects.get("scaler"):
            s.scaler.load_state_dict(objects["scaler"])
        snapshots.set_rng_state(objects["rng"])
        state = State(meta["step"], meta["epoch"], meta["group"], meta.get("nan_skips", 0))
        if state.step >= s.te_stop_step:
            s.stop_text_encoder()
        return state

    # --- saved models --------------------------------------------------------------------------------

    def save(self, state: State, final: bool, export: bool = True) -> list[Path]:
        """Write the model: exported files when `export`, and working/ (the model's own weights) when `final`.
        An intermediate save exports only; working/ changes when a run finishes or stops."""
        from .outputs import save_outputs

        s = self.session
        paths: list[Path] = []
        if s.ranks.is_main:
            with self.output_weights(), atomic.disk_full_guard(s.model_dir.root):
                paths = save_outputs(s, state.step, final, export)
            for path in paths:
                s.callbacks.on_saved(_saved_kind(s, path), path)
            self.saved += paths
            if not final:
                self.intermediate = snapshots.prune_outputs(self.intermediate + paths, s.config.save_keep_last)
        s.ranks.wait()
        return paths

    @contextlib.contextmanager
    def output_weights(self) -> Iterator[None]:
        """The weights to sample or save: EMA's when configured, schedule-free's averaged sequence."""
        s = self.session
        set_training_mode(s.optimizer, False)
        modes = [(m, m.training) for m in (s.components.denoiser, *s.components.present_text_encoders())]
        for module, _ in modes:
            module.eval()
        use_ema = s.ema is not None and s.config.ema_for_output
        try:
            with s.ema.applied() if use_ema else contextlib.nullcontext():  # type: ignore[union-attr]
                runtime.set_memory_format(s.components, False)
                try:
                    yield
                finally:
                    runtime.set_memory_format(s.components, s.channels_last)
        finally:
            for module, was_training in modes:
                module.train(was_training)
            set_training_mode(s.optimizer, True)

    # --- samples -------------------------------------------------------------------------------------

    def sample(self, step: int) -> None:
        s = self.session
        if not s.ranks.is_main:
            s.ranks.accelerator.wait_for_everyone()
            return
        prompts = sample_prompts(s.config, s.seed, training_resolutions(s.config)[0])
        if prompts:
            from ..models.components import build_pipeline

            s.callbacks.on_status(f"Sampling at step {step}")
            with self.output_weights(), textcache.encoders_on_device(s), torch.no_grad(), \
                    runtime.autocast(s.config, s.device):
                pipeline = build_pipeline(s.components, s.config.sample_scheduler)
                paths = render_samples(pipeline, prompts, s.model_dir.samples, step, s.device)
            s.callbacks.on_sample(step, paths, [p.prompt for p in prompts])
        s.ranks.wait()


def _saved_kind(session: Session, path: Path) -> str:
    if path.is_dir():
        return "working"
    return "lora" if session.config.method == "lora" else "checkpoint"
