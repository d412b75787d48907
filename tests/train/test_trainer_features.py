"""Trainer behaviour beyond the basic loop: SDXL conditioning and second text encoder, v-prediction targets,
the disk latent cache, validation loss, masks, pruning of intermediate saves, class images from the base model,
resume after the text encoder stopped, and exporting a trained LoRA on demand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth.errors import DreamboothError
from dreambooth.models.components import load_components
from dreambooth.service import TrainingService
from dreambooth.train import noise as noises
from dreambooth.train.checkpointer import Checkpointer
from dreambooth.train.events import LossRecord, TrainCallbacks, TrainCommands
from dreambooth.train.logs import read_jsonl
from dreambooth.train.loop import TrainLoop

from fake_host import FakeHost


class Losses(TrainCallbacks):
    def __init__(self, commands: TrainCommands | None = None, stop_at: int | None = None):
        self.records: list[LossRecord] = []
        self.commands, self.stop_at = commands, stop_at

    def on_loss(self, record: LossRecord) -> None:
        self.records.append(record)

    def on_progress(self, progress: Any) -> None:
        if self.commands is not None and progress.step == self.stop_at:
            self.commands.stop(save=True)

    def train_losses(self) -> list[float]:
        return [r.loss for r in self.records if r.validation_loss is None]


def _wide_image(folder: Path, size: tuple[int, int] = (180, 90)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(3).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "wide.png")
    return folder


def _capture_unet_calls(session: Any) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    real = session.denoiser

    def record(sample: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> Any:
        output = real(sample, timesteps, **kwargs)
        calls.append({"sample": sample.detach(), "timesteps": timesteps, "prediction": output.sample.detach(),
                      **kwargs})
        return output

    session.denoiser = record
    return calls


def _forward(session: Any, batch: list[Any]) -> torch.Tensor:
    return TrainLoop(session, Checkpointer(session), TrainCommands()).forward(batch, 0)


# --- SDXL ----------------------------------------------------------------------------------------------------

def test_sdxl_size_conditioning_and_second_text_encoder_lr(sdxl_env: Any) -> None:
    wide = _wide_image(sdxl_env.root / "wide")
    sdxl_env.config.concepts[0].instance_data_dir = str(wide)
    trainer = sdxl_env.trainer(with_prior_preservation=False, text_encoder_lr=1e-3, text_encoder_2_lr=0.0,
                               max_train_steps=2, train_batch_size=1)
    session, _ = trainer.setup()
    assert {g["name"]: g["lr"] for g in session.optimizer.param_groups} == {
        "unet": 1e-3, "text_encoder": 1e-3, "text_encoder_2": 0.0}
    batch = session.epoch_batches(0)[0]
    calls = _capture_unet_calls(session)
    _forward(session, batch)
    # original size (h, w), crop top-left (y, x) in the resized 128x64 image, target size (h, w)
    assert calls[0]["added_cond_kwargs"]["time_ids"].tolist() == [[90.0, 180.0, 0.0, 32.0, 64.0, 64.0]]
    assert calls[0]["added_cond_kwargs"]["text_embeds"].shape == (1, 32)

    base = load_components(sdxl_env.model.working)
    first, second = ([p.detach().clone() for p in e.parameters()] for e in base.text_encoders)
    trainer = sdxl_env.trainer(with_prior_preservation=False, text_encoder_lr=1e-3, text_encoder_2_lr=0.0,
                               save_on_end=False)
    trainer.run()
    assert trainer.session is not None
    after_first, after_second = ([p.detach() for p in e.parameters()] for e in trainer.session.components.text_encoders)
    assert any(not torch.equal(a, b) for a, b in zip(first, after_first, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(second, after_second, strict=True))


# --- v-prediction --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target_follows_the_prediction_type(env: Any, prediction_type: str) -> None:
    session, _ = env.trainer(prediction_type=prediction_type, force_prediction_type=True,
                             with_prior_preservation=False, train_batch_size=2).setup()
    batch = session.epoch_batches(0)[0]
    calls = _capture_unet_calls(session)
    loss = _forward(session, batch)
    call = calls[0]
    noise, _, timesteps = noises.batch_noise(tuple(call["sample"].shape[1:]), [i.seed for i in batch], 0,
                                             session.config, session.noise_scheduler.config.num_train_timesteps)
    assert torch.equal(timesteps, call["timesteps"])
    alpha_bar = session.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    # x_t = sqrt(ab) x0 + sqrt(1-ab) eps and v = sqrt(ab) eps - sqrt(1-ab) x0, hence v = (eps - sqrt(1-ab) x_t) / sqrt(ab)
    velocity = (noise - (1 - alpha_bar).sqrt() * call["sample"]) / alpha_bar.sqrt()
    expected = {"epsilon": noise, "v_prediction": velocity}
    mse = {name: float(((call["prediction"] - wanted) ** 2).mean()) for name, wanted in expected.items()}
    assert float(loss) == pytest.approx(mse[prediction_type], rel=1e-4)
    other = next(name for name in mse if name != prediction_type)
    assert float(loss) != pytest.approx(mse[other], rel=1e-2)


# --- caches, validation, masks, saves ------------------------------------------------------------------------

def test_disk_latent_cache_is_reused_by_the_next_run(env: Any) -> None:
    first, second = Losses(), Losses()
    trainer = env.trainer(first, cache_latents="disk", max_train_steps=2, save_on_end=False, resume=False)
    trainer.run()
    assert trainer.session.latent_cache.misses > 0 and list(env.model.cache.rglob("*.safetensors"))
    env.fresh()
    again = env.trainer(second, cache_latents="disk", max_train_steps=2, save_on_end=False, resume=False)
    again.run()
    assert again.session.latent_cache.misses == 0
    assert again.session.latent_cache.hits == trainer.session.latent_cache.misses
    assert second.train_losses() == first.train_losses()


def test_validation_loss_is_reported_and_logged(env: Any) -> None:
    callbacks = Losses()
    env.trainer(callbacks, validation_split=0.5, validation_every_n_steps=1, save_on_end=False).run()
    values = [(r.step, r.validation_loss) for r in callbacks.records if r.validation_loss is not None]
    assert [step for step, _ in values] == [1, 2] and all(v > 0 for _, v in values)
    logged = [row for row in read_jsonl(env.model.logging) if row.get("validation_loss") is not None]
    assert [row["validation_loss"] for row in logged] == pytest.approx([v for _, v in values])


def _masked_run(env: Any, mask_value: int | None) -> tuple[list[float], Any]:
    folder = env.root / f"masked-{mask_value}"
    for index, seed in enumerate((11, 12)):
        folder.mkdir(exist_ok=True)
        pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        if mask_value is not None:
            Image.new("L", (64, 64), mask_value).save(folder / f"img{index}-masklabel.png")
    env.config.concepts[0].instance_data_dir = str(folder)
    env.fresh()
    callbacks = Losses()
    trainer = env.trainer(callbacks, masked_training=True, unmasked_probability=0.0, unmasked_weight=0.0,
                          with_prior_preservation=False, weight_decay=0.0, text_encoder_weight_decay=0.0,
                          save_on_end=False, resume=False)
    trainer.run()
    return callbacks.train_losses(), trainer


def test_masks_weight_the_loss_through_the_trainer(env: Any) -> None:
    unmasked, _ = _masked_run(env, None)
    white, _ = _masked_run(env, 255)
    black, trainer = _masked_run(env, 0)
    assert white == pytest.approx(unmasked, rel=1e-6)  # a full mask trains like no mask
    assert black == [0.0, 0.0]  # nothing outside the mask counts with unmasked_weight 0
    base = load_file(str(env.base_working / "unet" / "diffusion_pytorch_model.safetensors"))
    trained = dict(trainer.session.components.denoiser.named_parameters())
    assert all(torch.equal(base[k], trained[k].detach()) for k in base)


def test_keep_last_n_prunes_intermediate_saves(env: Any) -> None:
    result = env.trainer(max_train_steps=4, save_every_n_steps=1, save_keep_last=2, save_on_end=True).run()
    names = sorted(p.name for p in env.layout.checkpoints_dir.iterdir())
    assert names == ["tiny_2.safetensors", "tiny_3.safetensors", "tiny_4.safetensors"]
    assert env.layout.checkpoints_dir / "tiny_1.safetensors" in result.saved  # written, then pruned


def test_class_images_are_generated_from_the_base_checkpoint(env: Any) -> None:
    base = env.layout.checkpoints_dir / "base.safetensors"
    base.write_bytes(b"stand-in")
    env.config.concepts[0].class_data_dir = ""
    env.trainer(base_checkpoint="base.safetensors", max_train_steps=1, save_on_end=False).run()
    assert len(env.host.requests) == 1
    request = env.host.requests[0]
    assert request.checkpoint == base and request.model_dir == env.model.working
    assert request.prompt == "photo of a dog" and request.count == 2


def test_resume_after_the_text_encoder_stopped_keeps_its_training(env: Any) -> None:
    settings = {"method": "lora", "lora_rank": 4, "lora_alpha": 4.0, "max_train_steps": 4,
                "stop_text_encoder": 0.5, "train_batch_size": 1}
    env.trainer(resume=False, **settings).run()
    straight = load_file(str(env.layout.lora_dir / "tiny_4.safetensors"))
    env.fresh()
    commands = TrainCommands()
    assert env.trainer(Losses(commands, stop_at=3), commands, resume=False, **settings).run().stopped
    env.trainer(**settings).run()
    resumed = load_file(str(sorted(env.layout.lora_dir.glob("tiny_4*.safetensors"))[-1]))
    assert any(k.startswith("lora_te_") for k in straight)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


# --- LoRA export on demand -----------------------------------------------------------------------------------

def test_service_exports_the_trained_lora(env: Any) -> None:
    service = TrainingService(FakeHost(env.layout))
    with pytest.raises(DreamboothError, match="train"):
        service.export_lora("tiny")
    env.config = env.configured(method="lora", lora_rank=4, lora_alpha=4.0, save_on_end=True)
    env.model.save_config(env.config)
    trained = env.trainer().run().saved[0]
    exported = service.export_lora("tiny")
    assert exported == env.layout.lora_dir / "tiny.safetensors"
    ours, theirs = load_file(str(exported)), load_file(str(trained))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    half = load_file(str(service.export_lora("tiny", precision="fp16")))
    assert {v.dtype for k, v in half.items() if not k.endswith(".alpha")} == {torch.float16}


# --- the prediction type recorded with the weights -----------------------------------------------------------

def test_the_weights_prediction_type_wins_unless_forced(env: Any) -> None:
    from dreambooth.errors import ConfigError
    from dreambooth.models.components import read_family

    with pytest.raises(ConfigError, match=r"'prediction_type' is v_prediction .* recorded as epsilon.*"
                                          r"set 'prediction_type' to epsilon.*'force_prediction_type'"):
        env.trainer(prediction_type="v_prediction").run()
    assert read_family(env.model.working)["prediction_type"] == "epsilon"
    result = env.trainer(prediction_type="v_prediction", force_prediction_type=True, resume=False).run()
    assert result.completed
    # The retrained weights now record v-prediction: the old setting is the one refused now.
    assert read_family(env.model.working)["prediction_type"] == "v_prediction"
    with pytest.raises(ConfigError, match="'prediction_type' is epsilon"):
        env.trainer(resume=False).run()
