"""SD3 / SD 3.5 through the one training loop: DreamBooth with prior preservation, LoRA and full fine-tune on
the tiny model (CLIP-L, CLIP-G, T5, a two-block MMDiT), flow matching, samples, bit-exact resume, exports."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.errors import ConfigError
from dreambooth.models.components import load_components
from dreambooth.models.export import model_to_ldm
from dreambooth.train.events import TrainCallbacks, TrainCommands, TrainObserver

pytestmark = pytest.mark.usefixtures("one_thread")


def transformer_weights(env: Any) -> dict[str, torch.Tensor]:
    return load_file(str(env.model.working / "transformer" / "diffusion_pytorch_model.safetensors"))


class StopAt(TrainCallbacks):
    def __init__(self, commands: TrainCommands, step: int):
        self.commands, self.step = commands, step

    def on_progress(self, progress: Any) -> None:
        if progress.step == self.step:
            self.commands.stop(save=True)


class Batches(TrainObserver):
    """Which images each step trained on (instance and class images: prior preservation)."""

    def __init__(self) -> None:
        self.kinds: list[bool] = []

    def on_batch(self, step: int, items: list[Any]) -> None:
        self.kinds += [item.record.is_class for item in items]


def test_dreambooth_with_prior_trains_the_transformer_and_exports_the_single_file(sd3_env: Any) -> None:
    before = transformer_weights(sd3_env)
    batches = Batches()
    result = sd3_env.trainer(observers=[batches], max_train_steps=4, train_text_encoder=False).run()
    assert result.completed and True in batches.kinds and False in batches.kinds
    after = transformer_weights(sd3_env)
    assert any(not torch.equal(before[key], after[key]) for key in before)
    exported = load_file(str(sd3_env.layout.checkpoints_dir / "tiny_4.safetensors"))
    assert {"text_encoders.clip_l", "text_encoders.clip_g", "text_encoders.t5xxl"} <= {
        key.split(".transformer.")[0] for key in exported}
    trained = model_to_ldm(load_components(sd3_env.model.working))
    transformer = {key for key in trained if key.startswith("model.diffusion_model.")}
    assert transformer and all(torch.equal(exported[key], trained[key]) for key in transformer)
    assert any(key.startswith("model.diffusion_model.joint_blocks.1.context_block.") for key in transformer)


def test_lora_trains_adapters_only_and_writes_loader_keys(sd3_env: Any) -> None:
    before = transformer_weights(sd3_env)
    result = sd3_env.trainer(method="lora", lora_rank=4, lora_alpha=8.0).run()
    tensors = load_file(str(result.saved[0]))
    assert all(key.count(".") >= 2 for key in tensors)  # A1111 1.10 splits SD3 LoRA keys at the last two dots
    assert not any(key.endswith(".alpha") for key in tensors)
    assert {"lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_down.weight",
            "lora_unet_joint_blocks_1_context_block_attn_qkv.lora_up.weight"} <= set(tensors)
    assert any(key.startswith("lora_te1_text_model_encoder_layers_") for key in tensors)
    assert not any(key.startswith("lora_te3") for key in tensors)  # T5 never trains
    after = transformer_weights(sd3_env)
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_lora_in_diffusers_names_for_sdnext(sd3_env: Any) -> None:
    result = sd3_env.trainer(method="lora", lora_rank=4, train_text_encoder=False, lora_key_format="diffusers").run()
    tensors = load_file(str(result.saved[0]))
    assert "transformer.transformer_blocks.0.attn2.to_q.lora_down.weight" in tensors
    assert all(key.startswith("transformer.transformer_blocks.") for key in tensors)


def test_finetune_trains_clip_but_not_t5_or_clip_l_projection(sd3_env: Any) -> None:
    seen: dict[str, Any] = {}

    class Watch(TrainObserver):
        def on_session(self, session: Any) -> None:
            seen["trainable"] = {part: {id(p) for p in params} for part, params in session.trainable.items()}
            seen["projection"] = id(session.components.text_encoders[0].text_projection.weight)

    result = sd3_env.trainer(observers=[Watch()], method="finetune", with_prior_preservation=False).run()
    assert result.completed
    assert set(seen["trainable"]) == {"unet", "text_encoder", "text_encoder_2"}
    assert seen["projection"] not in seen["trainable"]["text_encoder"]


@pytest.mark.parametrize("method", ["dreambooth", "lora"])
def test_resume_is_bit_identical(sd3_env: Any, method: str) -> None:
    settings = {"method": method, "max_train_steps": 4, "lora_rank": 4, "lora_alpha": 4.0, "hflip": True,
                "flow_timestep_sampling": "mode", "flow_loss_weighting": "cosmap", "input_perturbation": 0.1}
    sd3_env.trainer(resume=False, **settings).run()

    def final() -> dict[str, torch.Tensor]:
        if method == "lora":
            return load_file(str(sorted(sd3_env.layout.lora_dir.glob("*.safetensors"))[-1]))
        return transformer_weights(sd3_env)

    straight = final()
    sd3_env.fresh()
    commands = TrainCommands()
    first = sd3_env.trainer(StopAt(commands, 2), commands, resume=False, **settings).run()
    assert first.stopped and first.step == 2
    resumed = sd3_env.trainer(**settings).run()
    assert resumed.completed and resumed.step == 4
    again = final()
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)


def test_samples_render_with_the_flow_sampler(sd3_env: Any) -> None:
    sd3_env.config.concepts[0].n_samples = 1
    sd3_env.config.concepts[0].sample_steps = 2
    result = sd3_env.trainer(max_train_steps=1, sample_every_n_steps=1).run()
    assert result.completed
    assert sorted(path.name for path in sd3_env.model.samples.glob("*.png")) != []


@pytest.mark.parametrize(("setting", "value"), [("min_snr_gamma", 5.0), ("offset_noise", 0.1),
                                                ("pyramid_noise_iterations", 4), ("zero_terminal_snr", True)])
def test_ddpm_settings_are_refused_for_flow_matching(sd3_env: Any, setting: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"'{setting}' does not apply to flow-matching"):
        sd3_env.trainer(**{setting: value}).run()


@pytest.mark.parametrize(("setting", "value", "reason"), [("lora_conv_rank", 4, "3x3 convolutions"),
                                                          ("use_dora", True, "no DoRA form"),
                                                          ("sample_scheduler", "ddim", "does not sample")])
def test_settings_sd3_cannot_honour_are_refused(sd3_env: Any, setting: str, value: Any, reason: str) -> None:
    overrides = {"method": "lora", setting: value, "sample_every_n_steps": 1}
    sd3_env.config.concepts[0].n_samples = 1
    with pytest.raises(ConfigError, match=reason):
        sd3_env.trainer(**overrides).run()


def test_t5_loads_in_the_compute_dtype_even_when_text_encoders_train(sd3_env: Any) -> None:
    from dreambooth.train import runtime

    dtypes = runtime.load_dtypes(sd3_env.configured(method="finetune", mixed_precision="bf16"))
    assert dtypes["text_encoder"] == dtypes["text_encoder_2"] == torch.float32
    assert dtypes["text_encoder_3"] == torch.bfloat16
