"""Training an SDXL v-prediction, zero-terminal-SNR model (sdxlv): the v objective on the rescaled schedule,
samples drawn as the model is meant to be sampled, and outputs (checkpoint and LoRA) that say what they are."""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth.models.components import load_components, uses_zero_terminal_snr
from dreambooth.models.loading import CONFIGS_METADATA_KEY, load_checkpoint
from dreambooth.models.tiny import tiny_configs
from dreambooth.train import loss as loss_module
from dreambooth.train import sampling
from dreambooth.train.events import TrainCallbacks, TrainCommands, TrainObserver


class SessionSpy(TrainObserver):
    def __init__(self) -> None:
        self.session: Any = None

    def on_session(self, session: Any) -> None:
        self.session = session


def test_training_uses_the_v_target_on_the_rescaled_schedule(sdxlv_env: Any) -> None:
    spy, seen = SessionSpy(), []
    real_add_noise, real_loss = loss_module.add_noise, loss_module.elementwise_loss

    def add_noise(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> Any:
        seen.append({"scheduler": scheduler, "latents": latents, "noise": noise, "timesteps": timesteps})
        return real_add_noise(scheduler, latents, noise, timesteps)

    def elementwise_loss(prediction: torch.Tensor, wanted: torch.Tensor, *args: Any) -> torch.Tensor:
        seen[-1]["wanted"] = wanted
        return real_loss(prediction, wanted, *args)

    with mock.patch.object(loss_module, "add_noise", add_noise), \
            mock.patch.object(loss_module, "elementwise_loss", elementwise_loss):
        result = sdxlv_env.trainer(observers=[spy], max_train_steps=2, save_on_end=False).run()
    assert result.completed
    scheduler = spy.session.noise_scheduler
    assert spy.session.prediction_type == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr and float(scheduler.alphas_cumprod[-1]) == 0.0
    assert float(spy.session.alphas_cumprod[-1]) == 0.0  # min-SNR weights read the same schedule
    for call in seen:
        assert call["scheduler"] is scheduler
        velocity = scheduler.get_velocity(call["latents"], call["noise"], call["timesteps"])
        assert torch.equal(call["wanted"], velocity) and not torch.equal(call["wanted"], call["noise"])


def test_turning_zero_terminal_snr_off_trains_and_exports_the_plain_schedule(sdxlv_env: Any) -> None:
    spy = SessionSpy()
    assert sdxlv_env.trainer(observers=[spy], zero_terminal_snr=False, max_train_steps=1).run().completed
    assert float(spy.session.alphas_cumprod[-1]) > 0
    assert not uses_zero_terminal_snr(load_components(sdxlv_env.model.working))
    exported = next(sdxlv_env.layout.checkpoints_dir.glob("*.safetensors"))
    with safe_open(str(exported), "pt") as handle:
        assert "v_pred" in handle.keys() and "ztsnr" not in handle.keys()


def test_the_exported_checkpoint_reloads_as_vpred_with_the_rescaled_schedule(sdxlv_env: Any) -> None:
    assert sdxlv_env.trainer(max_train_steps=1).run().completed
    assert uses_zero_terminal_snr(load_components(sdxlv_env.model.working))
    exported = next(sdxlv_env.layout.checkpoints_dir.glob("*.safetensors"))
    with safe_open(str(exported), "pt") as handle:
        assert {"v_pred", "ztsnr"} <= set(handle.keys())
        metadata = handle.metadata()
    assert metadata["dreambooth_zero_terminal_snr"] == "True"
    assert "VScaling" in exported.with_suffix(".yaml").read_text()
    # Loaded as a host would see it: without our metadata, from the keys (and the yaml) alone.
    from safetensors.torch import save_file

    bare = exported.with_name("bare.safetensors")
    save_file(load_file(str(exported)), str(bare), metadata={CONFIGS_METADATA_KEY: json.dumps(tiny_configs("sdxlv"))})
    loaded = load_checkpoint(bare)
    assert (loaded.family, loaded.prediction_type, uses_zero_terminal_snr(loaded)) == ("sdxlv", "v_prediction", True)


def test_a_lora_on_the_model_trains_v_and_its_metadata_says_so(sdxlv_env: Any) -> None:
    spy = SessionSpy()
    result = sdxlv_env.trainer(observers=[spy], method="lora", lora_rank=2, lora_alpha=2.0, max_train_steps=1).run()
    assert result.completed and spy.session.prediction_type == "v_prediction"
    assert float(spy.session.alphas_cumprod[-1]) == 0.0
    path = next(sdxlv_env.layout.lora_dir.glob("*.safetensors"))
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_v_parameterization"], metadata["ss_zero_terminal_snr"], metadata["modelspec.prediction_type"],
            metadata["ss_base_model_version"]) == ("True", "True", "v", "sdxl_base_v1-0")


def test_samples_during_training_use_v_trailing_steps_and_rescaled_guidance(sdxlv_env: Any) -> None:
    drawn: list[dict[str, Any]] = []
    real_render = sampling.render

    def render(pipeline: Any, prompt: Any, device: Any) -> Any:
        image = real_render(pipeline, prompt, device)
        drawn.append({"config": dict(pipeline.scheduler.config), "first": int(pipeline.scheduler.timesteps[0]),
                      "guidance_rescale": pipeline.guidance_rescale})
        return image

    concept = sdxlv_env.config.concepts[0]
    concept.n_samples, concept.sample_steps = 1, 2
    with mock.patch.object(sampling, "render", render):
        result = sdxlv_env.trainer(max_train_steps=1, sample_every_n_steps=1, save_on_end=False).run()
    assert result.completed and drawn
    for sample in drawn:
        assert (sample["config"]["prediction_type"], sample["config"]["rescale_betas_zero_snr"],
                sample["config"]["timestep_spacing"]) == ("v_prediction", True, "trailing")
        assert sample["first"] == 999 and sample["guidance_rescale"] == 0.7


class StopAt(TrainCallbacks):
    """Stops the run with a snapshot after `step`."""

    def __init__(self, commands: TrainCommands, step: int):
        self.commands, self.step = commands, step

    def on_progress(self, progress: Any) -> None:
        if progress.step == self.step:
            self.commands.stop(save=True)


def test_a_resumed_run_ends_bit_identical(sdxlv_env: Any) -> None:
    settings = {"max_train_steps": 3, "save_on_end": False, "min_snr_gamma": 5.0}
    assert sdxlv_env.trainer(resume=False, **settings).run().completed
    straight = load_file(str(sdxlv_env.model.working / "unet" / "diffusion_pytorch_model.safetensors"))
    sdxlv_env.fresh()
    commands = TrainCommands()
    first = sdxlv_env.trainer(StopAt(commands, 1), commands, resume=False, **settings).run()
    assert first.stopped and first.snapshot is not None
    assert sdxlv_env.trainer(**settings).run().completed
    resumed = load_file(str(sdxlv_env.model.working / "unet" / "diffusion_pytorch_model.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
