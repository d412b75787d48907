"""The training loop on the tiny SD1 model: outputs, commands, resume, prior loss, NaN handling, logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.errors import ConfigError, DreamboothError, TrainingError
from dreambooth.families.clip_text import final_layer_norm
from dreambooth.train import loss as loss_module
from dreambooth.train.checkpointer import Checkpointer
from dreambooth.train.events import LossRecord, Progress, TrainCallbacks, TrainCommands, TrainObserver
from dreambooth.train.logs import TrainLog, read_jsonl
from dreambooth.train.loop import TrainLoop


class Recorder(TrainCallbacks):
    def __init__(self, commands: TrainCommands | None = None, stop_at: int | None = None, save: bool = True,
                 actions: dict[int, str] | None = None):
        self.commands, self.stop_at, self.save, self.actions = commands, stop_at, save, actions or {}
        self.losses: list[LossRecord] = []
        self.progress: list[Progress] = []
        self.saved: list[tuple[str, Path]] = []
        self.samples: list[tuple[int, list[Path]]] = []
        self.warnings: list[str] = []
        self.errors: list[str] = []

    def on_progress(self, progress: Progress) -> None:
        self.progress.append(progress)
        assert self.commands is not None or not (self.stop_at or self.actions)
        if self.commands and progress.step == self.stop_at:
            self.commands.stop(save=self.save)
        action = self.actions.get(progress.step)
        if self.commands and action == "save":
            self.commands.save_now()
        if self.commands and action == "sample":
            self.commands.sample_now()

    def on_loss(self, record: LossRecord) -> None:
        self.losses.append(record)

    def on_saved(self, kind: str, path: Path) -> None:
        self.saved.append((kind, path))

    def on_sample(self, step: int, paths: list[Path], prompts: list[str]) -> None:
        self.samples.append((step, paths))

    def on_warning(self, text: str) -> None:
        self.warnings.append(text)

    def on_error(self, text: str) -> None:
        self.errors.append(text)


def unet_weights(working: Path) -> dict[str, torch.Tensor]:
    return load_file(str(working / "unet" / "diffusion_pytorch_model.safetensors"))


def test_dreambooth_run_trains_saves_exports_and_logs(env: Any) -> None:
    before = unet_weights(env.model.working)
    callbacks = Recorder()
    result = env.trainer(callbacks).run()
    assert result.completed and result.step == 2
    after = unet_weights(env.model.working)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    exported = env.layout.checkpoints_dir / "tiny_2.safetensors"
    assert exported in result.saved and exported.is_file()
    assert {kind for kind, _ in callbacks.saved} >= {"working", "checkpoint", "snapshot"}
    assert [p.step for p in callbacks.progress] == [1, 2]
    rows = read_jsonl(env.model.logging)
    assert [row["step"] for row in rows] == [1, 2] and "lr/unet" in rows[0] and "lr/text_encoder" in rows[0]
    assert (env.model.logging / "train_log.csv").read_text().startswith("step,loss,lr/unet")
    assert env.host.call_names().count("refresh_checkpoints") == 1


def test_lora_run_exports_to_lora_folder_and_keeps_base_weights(env: Any) -> None:
    before = unet_weights(env.model.working)
    result = env.trainer(method="lora", lora_rank=4, lora_alpha=4.0).run()
    assert result.saved == [env.layout.lora_dir / "tiny_2.safetensors"]
    keys = load_file(str(result.saved[0]))
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    after = unet_weights(env.model.working)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "refresh_loras" in env.host.call_names()


def _final_tensors(env: Any, method: str) -> dict[str, torch.Tensor]:
    if method == "lora":
        return load_file(str(sorted(env.layout.lora_dir.glob("*.safetensors"))[-1]))
    return unet_weights(env.model.working)


@pytest.mark.parametrize("method", ["dreambooth", "lora"])
def test_resume_is_bit_identical(env: Any, method: str) -> None:
    settings = {"method": method, "max_train_steps": 4, "lora_rank": 4, "lora_alpha": 4.0, "lora_dropout": 0.1,
                "use_ema": True, "lr_scheduler": "cosine", "hflip": True, "shuffle_tags": True}
    env.trainer(resume=False, **settings).run()
    straight = _final_tensors(env, method)
    env.fresh()
    commands = TrainCommands()
    first = env.trainer(Recorder(commands, stop_at=2), commands, resume=False, **settings).run()
    assert first.stopped and first.step == 2 and first.snapshot is not None
    resumed = env.trainer(**settings).run()
    assert resumed.completed and resumed.step == 4
    final = _final_tensors(env, method)
    assert straight.keys() == final.keys()
    assert all(torch.equal(straight[k], final[k]) for k in straight)


def test_resumed_run_logs_each_step_once(env: Any) -> None:
    """Killed at step 3 after the step-2 snapshot (a stop without save leaves the disk as such a crash):
    the resumed run redoes step 3, and the log must hold it once."""
    settings = {"max_train_steps": 4, "snapshot_every_n_steps": 2, "log_every_n_steps": 1}
    commands = TrainCommands()
    env.trainer(Recorder(commands, stop_at=3, save=False), commands, resume=False, **settings).run()
    assert [row["step"] for row in read_jsonl(env.model.logging)] == [1, 2, 3]
    assert env.trainer(**settings).run().completed
    assert [row["step"] for row in read_jsonl(env.model.logging)] == [1, 2, 3, 4]
    csv_steps = [line.split(",")[0] for line in (env.model.logging / "train_log.csv").read_text().splitlines()]
    assert csv_steps == ["step", "1", "2", "3", "4"]


def test_dropping_an_interrupted_runs_rows_keeps_earlier_runs(tmp_path: Path) -> None:
    log = TrainLog(tmp_path, ["unet"], 1)
    for step in [1, 2, 3, 4, 1, 2, 3]:  # a finished run, then one interrupted after its step-2 snapshot
        log.write(LossRecord(step, 0.5, {"unet": 1e-4}), 1.0)
    log.drop_rows_after(2)
    log.close()
    assert [row["step"] for row in read_jsonl(tmp_path)] == [1, 2, 3, 4, 1, 2]
    assert [line.split(",")[0] for line in (tmp_path / "train_log.csv").read_text().splitlines()] == [
        "step", "1", "2", "3", "4", "1", "2"]


def test_stop_without_save_exports_nothing_but_working_holds_the_trained_weights(env: Any) -> None:
    before = unet_weights(env.model.working)
    commands = TrainCommands()
    result = env.trainer(Recorder(commands, stop_at=1, save=False), commands, max_train_steps=3).run()
    assert result.stopped and result.saved == [env.model.working] and result.snapshot is None
    assert not list(env.layout.checkpoints_dir.iterdir())
    after = unet_weights(env.model.working)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("stop_at", [None, 1])
def test_without_save_on_end_working_still_holds_the_trained_weights(env: Any, stop_at: int | None) -> None:
    """save_on_end governs the exported files only; the next run and exports start from working/."""
    before = unet_weights(env.model.working)
    commands = TrainCommands()
    result = env.trainer(Recorder(commands, stop_at=stop_at), commands, max_train_steps=3, save_on_end=False).run()
    assert result.completed is (stop_at is None) and env.model.working in result.saved
    after = unet_weights(env.model.working)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    exported = list(env.layout.checkpoints_dir.iterdir())
    assert exported == ([] if stop_at is None else [env.layout.checkpoints_dir / "tiny_1.safetensors"])


def test_save_now_and_sample_now(env: Any) -> None:
    commands = TrainCommands()
    callbacks = Recorder(commands, actions={1: "save", 2: "sample"})
    env.config.concepts[0].n_samples = 1
    env.config.concepts[0].sample_steps = 2
    result = env.trainer(callbacks, commands, max_train_steps=3, save_on_end=False).run()
    assert (env.layout.checkpoints_dir / "tiny_1.safetensors").is_file()
    # save_on_end off: no final export, but working/ gets the trained weights
    assert result.saved == [env.layout.checkpoints_dir / "tiny_1.safetensors", env.model.working]
    assert len(callbacks.samples) == 1 and callbacks.samples[0][0] == 2
    assert callbacks.samples[0][1][0].is_file() and callbacks.samples[0][1][0].parent == env.model.samples


def _grads(env: Any, prior_loss_weight: float, only_instance: bool = False) -> torch.Tensor:
    session, _ = env.trainer(prior_loss_weight=prior_loss_weight, train_batch_size=4,
                             train_text_encoder=False).setup()
    batch = session.epoch_batches(0)[0]
    assert {item.record.is_class for item in batch} == {True, False}
    if only_instance:
        batch = [item for item in batch if not item.record.is_class]
    session.optimizer.zero_grad(set_to_none=True)
    loss = TrainLoop(session, Checkpointer(session), TrainCommands()).forward(batch, 0) * (len(batch) / 4)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in session.params])


def test_prior_loss_weight_is_per_sample(env: Any) -> None:
    full = _grads(env, 1.0)
    half = _grads(env, 0.5)
    zero = _grads(env, 0.0)
    instance_only = _grads(env, 1.0, only_instance=True)
    assert not torch.allclose(full, half) and not torch.allclose(half, zero)
    # weight 0: the class images contribute nothing at all
    assert torch.allclose(zero, instance_only, atol=1e-7)
    # the gradient is linear in the weight: half is the midpoint of 0 and 1
    assert torch.allclose(half, (full + zero) / 2, atol=1e-6)


def _nan_loss(monkeypatch: pytest.MonkeyPatch, bad_steps: set[int]) -> None:
    real = loss_module.batch_loss
    calls = {"n": 0}

    def maybe_nan(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        value = real(per_sample, weights)
        return value * float("nan") if calls["n"] in bad_steps else value

    monkeypatch.setattr(loss_module, "batch_loss", maybe_nan)


def test_nan_stops_and_keeps_last_good_save(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_loss(monkeypatch, {2})
    callbacks = Recorder()
    with pytest.raises(TrainingError, match="NaN.*learning rate.*fp16"):
        env.trainer(callbacks, max_train_steps=3, save_every_n_steps=1).run()
    assert (env.layout.checkpoints_dir / "tiny_1.safetensors").is_file()
    assert not (env.layout.checkpoints_dir / "tiny_2.safetensors").exists()
    assert callbacks.errors


def test_nan_skip_policy_skips_up_to_the_limit(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_loss(monkeypatch, {2})
    callbacks = Recorder()
    result = env.trainer(callbacks, max_train_steps=3, nan_policy="skip", max_nan_skips=1).run()
    assert result.completed and any("skipped" in w for w in callbacks.warnings)
    monkeypatch.undo()
    _nan_loss(monkeypatch, {1, 2})
    env.fresh()
    with pytest.raises(TrainingError, match="NaN"):
        env.trainer(max_train_steps=3, nan_policy="skip", max_nan_skips=1, resume=False).run()


def test_refusals_are_clear(env: Any) -> None:
    with pytest.raises(DreamboothError, match="cache_text_encoder_outputs.*train_text_encoder"):
        env.trainer(cache_text_encoder_outputs="on").run()
    with pytest.raises(ConfigError, match="mixed_precision.*CUDA"):
        env.trainer(mixed_precision="fp16").run()
    with pytest.raises(ConfigError, match="model_family"):
        env.trainer(model_family="sdxl").run()


def test_xformers_without_cuda_falls_back_with_a_message(env: Any) -> None:
    callbacks = Recorder()
    env.trainer(callbacks, attention="xformers", max_train_steps=1).run()
    assert any("xformers" in w and "SDPA" in w for w in callbacks.warnings)


def test_stop_text_encoder_freezes_it_after_the_fraction(env: Any) -> None:
    seen = []

    class Watch(TrainObserver):
        def on_session(self, session: Any) -> None:
            self.encoder = session.components.text_encoders[0]

        def on_step(self, step: int) -> None:
            seen.append(final_layer_norm(self.encoder).weight.detach().clone())

    env.trainer(max_train_steps=4, stop_text_encoder=0.5, save_on_end=False, observers=[Watch()]).run()
    assert not torch.equal(seen[0], seen[1])
    assert torch.equal(seen[1], seen[2]) and torch.equal(seen[2], seen[3])


def test_bf16_trains_frozen_weights_in_bf16_and_masters_in_fp32(env: Any) -> None:
    session, _ = env.trainer(mixed_precision="bf16", method="lora", lora_rank=4).setup()
    assert all(p.dtype == torch.float32 for p in session.params)
    frozen = [p for p in session.components.denoiser.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    result = env.trainer(mixed_precision="bf16", method="lora", lora_rank=4).run()
    assert result.completed and result.loss is not None and result.loss == result.loss


def test_run_training_for_the_cli(env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from dreambooth.cli_train import run_training

    assert run_training(env.layout, "tiny", {"max_train_steps": "1", "concepts.0.repeats": "2"}) == 0
    out = capsys.readouterr().out
    assert "step 1/1" in out and "tiny_1.safetensors" in out
    assert run_training(env.layout, "tiny", {"mixed_precision": "fp16"}) == 1
