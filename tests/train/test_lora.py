"""LoRA injection, export and the host-format loader on tiny models.

The central check: a file written by export_lora, merged into fresh base components by
apply_host_lora (the host's name matching and scaling rules) at weight 1.0, gives the same UNet and
text-encoder outputs as peft's own merge of the trained adapters.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth.config.schema import TrainingConfig
from dreambooth.errors import ConfigError, ModelError, TrainingError
from dreambooth.models.tiny import perturb_degenerate, tiny_components, tiny_configs
from dreambooth.train import lora


def make_config(family: str = "sd1", **overrides: Any) -> TrainingConfig:
    values = {"model_family": family, "method": "lora", "lora_rank": 4, "lora_alpha": 4.0, "save_precision": "fp32",
              "base_checkpoint": "base.safetensors", "model_name": "tiny", "resolution": 64, "max_train_steps": 10}
    values.update(overrides)
    return TrainingConfig(**values)


def family_of(variant: str) -> str:
    return "sd1" if variant == "sd1_two_layers" else variant


def base_components(variant: str) -> Any:
    """Fresh tiny components (copies of one build per variant: building is the slow part)."""
    pristine = _pristine_components(variant)
    return dataclasses.replace(pristine, denoiser=copy.deepcopy(pristine.denoiser),
                               text_encoders=[copy.deepcopy(encoder) for encoder in pristine.text_encoders])


@functools.cache
def _pristine_components(variant: str, seed: int = 0) -> Any:
    """Tiny components; 'sd1_two_layers' has SD1's block layout with 2 layers per block, the layout
    A1111's diffusers-name converter assumes, so its keys take the diffusers-style path."""
    from diffusers import UNet2DConditionModel

    components = tiny_components(family_of(variant), seed=seed)
    if variant == "sd1_two_layers":
        unet_config = tiny_configs("sd1")["unet"]
        unet_config.update(layers_per_block=2, block_out_channels=[32, 32, 64],
                           down_block_types=["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
                           up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            components.denoiser = UNet2DConditionModel.from_config(unet_config).eval()
        perturb_degenerate(components.denoiser, torch.Generator().manual_seed(seed))
    return components


def randomise_adapters(params: dict[str, list[torch.nn.Parameter]], seed: int = 1, scale: float = 0.1) -> None:
    """Stand-in for training: peft starts with lora_B = 0, which would make every check trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in params.values():
            for param in group:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def trained_components(variant: str, config: TrainingConfig) -> Any:
    components = base_components(variant)
    randomise_adapters(lora.add_lora(components, config))
    return components


def model_outputs(components: Any) -> list[torch.Tensor]:
    """UNet and text-encoder outputs on fixed inputs, in eval mode."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 49407, (1, 8), generator=generator)
    outputs = []
    with torch.no_grad():
        for encoder in components.text_encoders:
            outputs.append(encoder.eval()(ids).last_hidden_state)
        unet = components.denoiser.eval()
        sample = torch.randn((1, 4, 8, 8), generator=generator)
        context = torch.randn((1, 8, unet.config.cross_attention_dim), generator=generator)
        extra = {}
        if components.family == "sdxl":
            text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn((1, text_dim), generator=generator),
                                          "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        outputs.append(unet(sample, torch.tensor([500]), context, **extra).sample)
    return outputs


def assert_outputs_close(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def assert_outputs_differ(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    for a, b in zip(first, second, strict=True):
        assert (a - b).abs().max() > 1e-3


def export(components: Any, config: TrainingConfig, path: Path, **metadata: str) -> dict[str, str]:
    lora.export_lora(components, config, path, metadata)
    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata())


SETTINGS = {
    "rank4_alpha1": {"lora_rank": 4, "lora_alpha": 1.0},
    "rank2_alpha8_locon": {"lora_rank": 2, "lora_alpha": 8.0, "lora_conv_rank": 3, "lora_conv_alpha": 1.5},
    "dora": {"lora_rank": 4, "lora_alpha": 2.0, "use_dora": True, "lora_conv_rank": 2, "lora_conv_alpha": 2.0},
}


# Every setting on the layout that takes the diffusers-style key path; every family's host rules
# (SD2's fused OpenCLIP attention, SDXL's two encoders and ldm-style keys) with cheaper subsets.
CASES = [("sd1_two_layers", setting) for setting in SETTINGS] + [
    ("sd1", "rank4_alpha1"), ("sd2", "rank2_alpha8_locon"), ("sd2", "dora"), ("sdxl", "rank2_alpha8_locon"),
    ("sdxl", "dora")]


@pytest.mark.parametrize(("variant", "setting"), CASES)
def test_host_loader_reproduces_trained_model(variant: str, setting: str, tmp_path: Path) -> None:
    config = make_config(family_of(variant), **SETTINGS[setting])
    trained = trained_components(variant, config)
    path = tmp_path / "lora.safetensors"
    export(trained, config, path)
    lora.merge_lora(trained)
    expected = model_outputs(trained)

    host = base_components(variant)
    base_outputs = model_outputs(host)
    assert lora.apply_host_lora(host, path, 1.0) == []
    assert_outputs_close(model_outputs(host), expected)
    assert_outputs_differ(expected, base_outputs)


def test_weight_scales_the_change(tmp_path: Path) -> None:
    config = make_config(lora_rank=4, lora_alpha=1.0)
    trained = trained_components("sd1", config)
    path = tmp_path / "lora.safetensors"
    export(trained, config, path)
    host, half = base_components("sd1"), base_components("sd1")
    lora.apply_host_lora(host, path, 1.0)
    lora.apply_host_lora(half, path, 0.5)
    base_weight = base_components("sd1").denoiser.down_blocks[0].attentions[0].proj_in.weight
    full_change = host.denoiser.down_blocks[0].attentions[0].proj_in.weight - base_weight
    half_change = half.denoiser.down_blocks[0].attentions[0].proj_in.weight - base_weight
    torch.testing.assert_close(half_change, 0.5 * full_change, rtol=1e-4, atol=1e-7)


def test_alpha_tensor_holds_trained_scale(tmp_path: Path) -> None:
    """rank 4, alpha 1: the file's alpha is 1 so the host applies 1/4, as peft did in training."""
    config = make_config(lora_rank=4, lora_alpha=1.0, lora_conv_rank=2, lora_conv_alpha=3.0)
    trained = trained_components("sd1", config)
    path = tmp_path / "lora.safetensors"
    metadata = export(trained, config, path)
    tensors = load_file(str(path))
    alphas = {key: float(value) for key, value in tensors.items() if key.endswith(".alpha")}
    conv_alphas = {alphas[key] for key in alphas if "resnets" in key or "samplers" in key}
    attention_alphas = {alphas[key] for key in alphas if "attentions" in key or "_te_" in key}
    assert conv_alphas == {3.0} and attention_alphas == {1.0}
    ranks = {tensors[key.replace(".alpha", ".lora_down.weight")].shape[0] for key in alphas if "resnets" in key}
    assert ranks == {2}
    assert metadata["ss_network_alpha"] == "1.0" and metadata["ss_network_dim"] == "4"


def test_settings_change_injected_layers() -> None:
    components = base_components("sd1")
    params = lora.add_lora(components, make_config(lora_rank=3, lora_alpha=6.0, lora_dropout=0.25))
    layers = dict(lora.lora_modules(components.denoiser))
    proj_in = layers["down_blocks.0.attentions.0.proj_in"]
    assert proj_in.lora_A["default"].weight.shape[0] == 3
    assert proj_in.scaling["default"] == pytest.approx(2.0)
    assert proj_in.lora_dropout["default"].p == 0.25
    assert not any(".resnets." in name for name in layers)
    assert set(params) == {"unet", "text_encoder"} and all(params.values())

    with_conv = base_components("sd1")
    lora.add_lora(with_conv, make_config(lora_rank=3, lora_conv_rank=5, lora_conv_alpha=10.0))
    conv = dict(lora.lora_modules(with_conv.denoiser))["down_blocks.0.resnets.0.conv1"]
    assert conv.lora_A["default"].weight.shape == (5, 32, 3, 3)
    assert conv.lora_B["default"].weight.shape == (32, 5, 1, 1)
    assert conv.scaling["default"] == pytest.approx(2.0)


def test_dropout_acts_in_training_mode() -> None:
    components = base_components("sd1")
    randomise_adapters(lora.add_lora(components, make_config(lora_dropout=0.5, train_unet=False)))
    encoder = components.text_encoders[0].train()
    ids = torch.arange(1, 9).unsqueeze(0)
    torch.manual_seed(0)
    first = encoder(ids).last_hidden_state
    second = encoder(ids).last_hidden_state
    assert (first - second).abs().max() > 1e-4
    encoder.eval()
    torch.testing.assert_close(encoder(ids).last_hidden_state, encoder(ids).last_hidden_state)


def test_dora_changes_outputs_and_exports_differences(tmp_path: Path) -> None:
    plain = trained_components("sd1", make_config())
    dora = trained_components("sd1", make_config(use_dora=True))
    assert any("lora_magnitude_vector" in key for key in lora.lora_state(dora))
    assert_outputs_differ(model_outputs(plain), model_outputs(dora))
    path = tmp_path / "dora.safetensors"
    metadata = export(dora, make_config(use_dora=True), path)
    assert all(key.endswith(".diff") for key in load_file(str(path)))
    assert json.loads(metadata["ss_network_args"])["dora"] == "true"


def test_only_adapters_train() -> None:
    components = base_components("sdxl")
    params = lora.add_lora(components, make_config("sdxl", train_text_encoder=False))
    assert params["text_encoder"] == [] and params["text_encoder_2"] == []
    trainable = [p for m in (components.denoiser, components.vae, *components.text_encoders) for p in m.parameters()
                 if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params["unet"]}
    assert all("lora_" in name for name, p in components.denoiser.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="train_unet"):
        lora.add_lora(base_components("sd1"), make_config(train_unet=False, train_text_encoder=False))


def test_output_name_unique_per_file(tmp_path: Path) -> None:
    config = make_config()
    first = trained_components("sd1", config)
    second = base_components("sd1")
    randomise_adapters(lora.add_lora(second, config), seed=2)
    name_a = export(first, config, tmp_path / "a" / "tiny.safetensors")["ss_output_name"]
    name_b = export(second, config, tmp_path / "b" / "tiny.safetensors")["ss_output_name"]
    assert name_a != name_b and name_a.startswith("tiny_") and name_b.startswith("tiny_")


@pytest.mark.parametrize(("family", "version", "v2"), [("sd1", "sd_v1", "False"), ("sd2", "sd_v2_512", "True"),
                                                      ("sd2v", "sd_v2_768_v", "True"),
                                                      ("sdxl", "sdxl_base_v1-0", "False")])
def test_metadata(family: str, version: str, v2: str, tmp_path: Path) -> None:
    config = make_config(family, learning_rate=1e-4, text_encoder_lr=5e-5)
    trained = trained_components(family, config)
    tags = json.dumps({"2_sks dog": {"sks": 2, "dog": 2}})
    path = tmp_path / "tiny.safetensors"
    metadata = export(trained, config, path, ss_steps="10", ss_tag_frequency=tags, ss_num_train_images="2")
    assert metadata["ss_base_model_version"] == version and metadata["ss_v2"] == v2
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_tag_frequency"] == tags and metadata["ss_steps"] == "10"
    assert metadata["ss_sd_model_name"] == "base.safetensors" and metadata["ss_resolution"] == "(64, 64)"
    assert metadata["ss_unet_lr"] == "0.0001" and metadata["ss_text_encoder_lr"] == "5e-05"
    assert metadata["dreambooth_settings_hash"] == lora.settings_hash(config)
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()


def test_export_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    config = make_config()
    trained = trained_components("sd1", config)
    path = tmp_path / "tiny.safetensors"
    export(trained, config, path)
    before = path.read_bytes()

    def broken_save(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        lora.export_lora(trained, make_config(lora_alpha=2.0), path, {})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.safetensors"]


def test_fp16_keeps_change_and_warns_when_lost(tmp_path: Path) -> None:
    config = make_config(save_precision="fp16")
    trained = trained_components("sd1", config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora.PrecisionWarning)
        export(trained, config, tmp_path / "ok.safetensors")
    assert load_file(str(tmp_path / "ok.safetensors"))[next(iter(lora.host_tensors(trained)))].dtype == torch.float16
    with torch.no_grad():
        for _, module in lora.lora_modules(trained.denoiser):
            module.lora_B["default"].weight.mul_(1e-9)
            module.lora_A["default"].weight.mul_(1e-9)
    with pytest.warns(lora.PrecisionWarning, match="save_precision"):
        export(trained, config, tmp_path / "lost.safetensors")


def test_state_roundtrip() -> None:
    config = make_config(use_dora=True, lora_conv_rank=2)
    trained = trained_components("sdxl", config)
    state = lora.lora_state(trained)
    fresh = base_components("sdxl")
    lora.add_lora(fresh, config)
    lora.load_lora_state(fresh, state)
    assert_outputs_close(model_outputs(fresh), model_outputs(trained))
    other = base_components("sdxl")
    lora.add_lora(other, make_config(lora_rank=8, use_dora=True, lora_conv_rank=2))
    with pytest.raises(TrainingError, match="rank"):
        lora.load_lora_state(other, state)


def test_host_loader_reports_keys_it_cannot_use(tmp_path: Path) -> None:
    from dreambooth.atomic import save_safetensors

    down, up = torch.randn(2, 32), torch.randn(32, 2)
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_inn.lora_down.weight": down.clone(),
               "lora_unet_down_blocks_0_attentions_0_proj_inn.lora_up.weight": up.clone(),
               # SD2's text encoder attention is one fused module: q alone is never applied by the host
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up}
    path = tmp_path / "bad.safetensors"
    save_safetensors(tensors, path)
    components = base_components("sd2")
    before = model_outputs(components)
    assert sorted(lora.apply_host_lora(components, path)) == sorted(tensors)
    assert_outputs_close(model_outputs(components), before)


def test_host_loader_needs_plain_components(tmp_path: Path) -> None:
    config = make_config()
    trained = trained_components("sd1", config)
    path = tmp_path / "tiny.safetensors"
    export(trained, config, path)
    with pytest.raises(ModelError, match="plain"):
        lora.apply_host_lora(trained, path)
