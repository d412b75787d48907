"""Snapshots belong to a run: a second run keeps its own snapshots, a start says what it resumes and why,
never resumes a finished run or one trained with other settings, and a cancel with save is resumable."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dreambooth.config.schema import (
    RUN_LENGTH_SETTINGS,
    SAME_RUN_CONCEPT_SETTINGS,
    SAME_RUN_SETTINGS,
    Concept,
    TrainingConfig,
    run_settings,
    settings,
)
from dreambooth.errors import DreamboothError
from dreambooth.service import FINISHED, TrainingService
from dreambooth.train import snapshots
from dreambooth.train.events import Progress, TrainCallbacks, TrainCommands

SNAPSHOTS = {"snapshot_every_n_steps": 2, "save_on_end": False, "with_prior_preservation": False}


class Watcher(TrainCallbacks):
    """Records status lines and warnings; stops (without saving, as a crash would leave it) at `stop_at`."""

    def __init__(self, commands: TrainCommands | None = None, stop_at: int | None = None, save: bool = False):
        self.commands, self.stop_at, self.save = commands, stop_at, save
        self.lines: list[str] = []

    def on_status(self, text: str) -> None:
        self.lines.append(text)

    def on_warning(self, text: str) -> None:
        self.lines.append(f"warning: {text}")

    def on_progress(self, progress: Progress) -> None:
        if self.commands is not None and progress.step == self.stop_at:
            self.commands.stop(save=self.save)


def run(env: Any, stop_at: int | None = None, save: bool = False, **overrides: Any) -> tuple[Any, Watcher]:
    commands = TrainCommands()
    watcher = Watcher(commands, stop_at, save)
    result = env.trainer(watcher, commands, **{**SNAPSHOTS, **overrides}).run()
    return result, watcher


def runs_on_disk(env: Any) -> list[tuple[str, int, bool]]:
    return [(m["run_id"], m["step"], bool(m.get("finished")))
            for m in map(snapshots.read_meta, snapshots.list_snapshots(env.model.snapshots))]


def resume_line(watcher: Watcher) -> str:
    return next(line for line in watcher.lines if "run " in line)


def test_a_shorter_second_run_resumes_its_own_snapshot_not_the_old_runs(env: Any) -> None:
    first, _ = run(env, max_train_steps=6)
    assert first.completed and runs_on_disk(env)[-1][1:] == (6, True)
    old_run = runs_on_disk(env)[-1][0]
    second, watcher = run(env, stop_at=3, max_train_steps=4)
    assert second.stopped and f"Run {old_run} finished at step 6; it is not resumed" in resume_line(watcher)
    [(new_run, step, finished)] = runs_on_disk(env)  # the old run's snapshot went once the new run had one
    assert (step, finished) == (2, False) and new_run != old_run
    resumed, watcher = run(env, max_train_steps=4)
    assert resumed.completed and resumed.step == 4
    assert resume_line(watcher) == f"Resuming run {new_run} from step 2 (snapshot step-00000002)."


def test_a_new_run_keeps_the_old_snapshots_until_it_has_one(env: Any) -> None:
    run(env, max_train_steps=4)
    before = runs_on_disk(env)
    result, _ = run(env, stop_at=1, max_train_steps=4)  # stopped before its first snapshot
    assert result.stopped and runs_on_disk(env) == before


def test_changed_training_settings_start_a_new_run_and_say_which(env: Any) -> None:
    run(env, stop_at=3, max_train_steps=6)
    [(old_run, _, _)] = runs_on_disk(env)
    result, watcher = run(env, max_train_steps=6, learning_rate=5e-4, hflip=True)
    warning = next(line for line in watcher.lines if line.startswith("warning: Run"))
    assert f"Run {old_run} stopped at step 2 was trained with other settings (hflip, learning_rate)" in warning
    assert result.completed and result.step == 6 and old_run not in {r for r, _, _ in runs_on_disk(env)}


def test_saving_preview_and_memory_settings_do_not_make_a_new_run(env: Any) -> None:
    run(env, stop_at=3, max_train_steps=4)
    [(old_run, _, _)] = runs_on_disk(env)
    result, watcher = run(env, max_train_steps=4, save_every_n_steps=1, sample_every_n_steps=0,
                          log_every_n_steps=3, gradient_checkpointing=True, max_nan_skips=20)
    assert resume_line(watcher).startswith(f"Resuming run {old_run} from step 2") and result.step == 4


def test_an_unfinished_run_is_extended_when_only_its_length_changes(env: Any) -> None:
    run(env, stop_at=3, max_train_steps=4)
    [(old_run, _, _)] = runs_on_disk(env)
    result, watcher = run(env, max_train_steps=6)
    assert resume_line(watcher) == (f"Resuming run {old_run} from step 2 (snapshot step-00000002); "
                                    "max_train_steps changed from 4 to 6.")
    assert result.completed and result.step == 6 and runs_on_disk(env)[-1] == (old_run, 6, True)


def test_cancel_with_save_after_a_longer_finished_run_is_resumable(env: Any) -> None:
    run(env, max_train_steps=6)
    stopped, _ = run(env, stop_at=3, save=True, max_train_steps=5, snapshot_every_n_steps=0)
    [(new_run, step, finished)] = runs_on_disk(env)
    assert stopped.snapshot is not None and stopped.snapshot.name == "step-00000003" and (step, finished) == (3, False)
    resumed, watcher = run(env, max_train_steps=5, snapshot_every_n_steps=0)
    assert resume_line(watcher).startswith(f"Resuming run {new_run} from step 3") and resumed.completed


def test_cancel_with_save_over_the_service_is_resumable(env: Any) -> None:
    env.model.save_config(env.configured(**{**SNAPSHOTS, "max_train_steps": 4}))
    env.trainer(**{**SNAPSHOTS, "max_train_steps": 4}).run()  # a finished run of the same model first
    env.model.save_config(env.configured(**{**SNAPSHOTS, "max_train_steps": 400, "snapshot_every_n_steps": 0}))
    service = TrainingService(env.host)
    service.start("tiny")
    deadline = time.monotonic() + 120
    while service.status().step < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    service.cancel(save=True)
    status = service.wait(120)
    assert status.state == FINISHED and status.message == "Stopped.", status.error
    [(_, step, finished)] = runs_on_disk(env)
    assert step == status.step and not finished
    decision = snapshots.resumable_snapshot(env.model.snapshots, run_settings(env.model.load_config()))
    assert decision.path is not None and decision.path.name == f"step-{status.step:08d}"


def test_an_old_pickled_snapshot_is_refused_not_loaded(env: Any, tmp_path: Path) -> None:
    old = snapshots.snapshot_path(env.model.snapshots, 2)
    old.mkdir(parents=True)
    torch.save({"optimizer": {}}, old / snapshots.LEGACY_OBJECTS_FILE)
    (old / snapshots.STATE_FILE).write_text('{"step": 2, "epoch": 0, "group": 2, "seed": 7}')
    with pytest.raises(DreamboothError, match="written by an older version with a format that can run code; it "
                                              "is not loaded: delete it or start without resume"):
        run(env, max_train_steps=4)
    result, _ = run(env, max_train_steps=4, resume=False)
    assert result.completed and not old.exists()  # replaced once the new run had a snapshot


# --- the pure rules ------------------------------------------------------------------------------------

def _write(root: Path, run_id: str, step: int, keep: int = 1, **meta: Any) -> Path:
    return snapshots.write_snapshot(root, step, {"w": torch.full((2,), float(step))}, {"rng": None},
                                    {"run_id": run_id, "settings": {"lr": 1}, **meta}, keep)


def test_pruning_keeps_the_newest_of_the_current_run_by_write_order(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        _write(tmp_path, "old", step, keep=2)
    assert [p.name for p in snapshots.list_snapshots(tmp_path)] == ["step-00000020", "step-00000030"]
    _write(tmp_path, "new", 5, keep=2)
    _write(tmp_path, "new", 10, keep=2)  # same step number as an old snapshot: written later, so newer
    assert runs(tmp_path) == [("new", 5), ("new", 10)]
    decision = snapshots.resumable_snapshot(tmp_path, {"lr": 1})
    assert decision.run_id == "new" and decision.path is not None and decision.path.name == "step-00000010"


def runs(root: Path) -> list[tuple[str, int]]:
    return [(m["run_id"], m["step"]) for m in map(snapshots.read_meta, snapshots.list_snapshots(root))]


def test_every_setting_is_either_part_of_a_run_or_named_with_a_reason() -> None:
    config = TrainingConfig(concepts=[Concept(), Concept()])
    fingerprint = run_settings(config)
    for f in settings(TrainingConfig):
        assert (f.name in fingerprint) != (f.name in SAME_RUN_SETTINGS), f.name
    for f in settings(Concept):
        assert (f"concept 2 {f.name}" in fingerprint) != (f.name in SAME_RUN_CONCEPT_SETTINGS), f.name
    assert set(RUN_LENGTH_SETTINGS) <= fingerprint.keys()
    assert all(f.metadata["ui_only"] is None or f.name in SAME_RUN_SETTINGS for f in settings(TrainingConfig))
