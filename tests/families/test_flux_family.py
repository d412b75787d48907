"""The Flux.1 family units (dev, schnell) on their tiny models: what training feeds the transformer is what
FluxPipeline feeds it, the resolution-dependent shift is the pipeline's, files and folders load back as the same
variant, LoRA keys name the fused original layers, and the settings Flux cannot train with are refused."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dreambooth.config.schema import TrainingConfig, validate
from dreambooth.errors import ConfigError
from dreambooth.families import flux_model, flux_names, get_family
from dreambooth.models.components import Components, build_pipeline, load_components, save_components
from dreambooth.models.export import checkpoint_state_dict, export_checkpoint
from dreambooth.models.loading import CONFIGS_METADATA_KEY, create_model, load_diffusers_folder, load_source
from dreambooth.models.tiny import tiny_components, tiny_configs, tiny_t5_tokenizer
from dreambooth.store import Layout, ModelStore
from dreambooth.train import lora, noise

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece", reason="the tiny T5 tokenizer is a SentencePiece model built on the fly")
if not hasattr(diffusers, "FluxTransformer2DModel"):
    pytest.skip("this diffusers has no FluxTransformer2DModel (Flux needs diffusers 0.30 or newer)",
                allow_module_level=True)

VARIANTS = ("flux-dev", "flux-schnell")


@functools.cache
def tiny(name: str) -> Components:
    return tiny_components(name, seed=0)


def valid_config(name: str, **changes: Any) -> TrainingConfig:
    return validate(TrainingConfig(**{**get_family(name).config_defaults(), **changes}))


@pytest.mark.parametrize("name", VARIANTS)
def test_defaults_are_a_valid_flow_matching_lora(name: str) -> None:
    family = get_family(name)
    config = valid_config(name)
    assert (config.prediction_type, config.method, config.sample_scheduler) == ("flow_matching", "lora", "euler")
    scheduler = family.make_noise_scheduler()
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert scheduler.config.use_dynamic_shifting == (name == "flux-dev") == config.flow_resolution_shift
    with pytest.raises(ConfigError, match="'method': dreambooth .* set 'method' to lora"):
        valid_config(name, method="dreambooth")
    with pytest.raises(ConfigError, match="'lora_conv_rank'"):
        family.denoiser_lora_targets(tiny(name).denoiser, with_conv=True)


def test_resolution_shift_is_refused_where_it_does_not_apply() -> None:
    with pytest.raises(ConfigError, match="'flow_resolution_shift' .* Flux.1 schnell samples with a fixed one"):
        valid_config("flux-schnell", flow_resolution_shift=True)
    with pytest.raises(ConfigError, match="'flow_shift' \\(2.0\\) and 'flow_resolution_shift' both set the shift"):
        valid_config("flux-dev", flow_shift=2.0)
    assert valid_config("flux-dev", flow_resolution_shift=False, flow_shift=3.16).flow_shift == 3.16
    with pytest.raises(ConfigError, match="'flow_resolution_shift' applies only to flow-matching models"):
        validate(TrainingConfig(model_family="sd1", flow_resolution_shift=True))


@pytest.mark.parametrize("pixels", [512, 1024, 768])
def test_resolution_shift_equals_the_pipelines(pixels: int) -> None:
    """The noise levels FluxPipeline samples at this size are the trained ones shifted the same way."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    family = get_family("flux-dev")
    config = family.scheduler_config()
    latent = pixels // 8
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    plain = [1.0, 0.75, 0.5, 0.25]
    mu = calculate_shift((latent // 2) ** 2, config["base_image_seq_len"], config["max_image_seq_len"],
                         config["base_shift"], config["max_shift"])
    scheduler.set_timesteps(sigmas=np.array(plain, dtype=np.float32), mu=mu)  # diffusers 0.31 needs an array
    shift = family.flow_shift(valid_config("flux-dev"), (16, latent, latent), config)
    ours = [noise.shift_timestep(t, shift) for t in plain]
    assert scheduler.sigmas[:4].tolist() == pytest.approx(ours, abs=1e-6)
    assert get_family("flux-schnell").flow_shift(valid_config("flux-schnell"), (16, latent, latent), config) == 1.0


def test_pack_is_the_pipelines_and_unpack_inverts_it() -> None:
    latents = torch.randn(2, 16, 6, 8)
    packed = flux_model.pack(latents)
    assert torch.equal(packed, diffusers.FluxPipeline._pack_latents(latents, 2, 16, 6, 8))
    assert torch.equal(flux_model.unpack(packed, 6, 8), latents)
    ids = flux_model.image_ids(6, 8, torch.device("cpu"), torch.float32)
    assert ids.shape == (12, 3) and ids[5].tolist() == [0.0, 1.0, 1.0] and ids[:, 0].abs().sum() == 0


class Captured:
    """The transformer's inputs and output of one pipeline step."""

    def __init__(self, transformer: Any) -> None:
        self.calls: list[tuple[dict[str, Any], torch.Tensor]] = []
        self.handle = transformer.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        self.calls.append((dict(kwargs), output[0] if isinstance(output, tuple) else output.sample))


@pytest.mark.parametrize("name", VARIANTS)
def test_training_prediction_is_what_the_pipeline_computes(name: str) -> None:
    """The family's predict on the pipeline's noisy latents and noise level gives the pipeline's velocity: the
    same caption encoding, packing, position ids, timestep scale and guidance."""
    components, family = tiny(name), get_family(name)
    pipeline = build_pipeline(components, "euler")
    captured = Captured(components.denoiser)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        pipeline(prompt="photo of sks dog", negative_prompt=None, width=64, height=64, num_inference_steps=1,
                 guidance_scale=flux_model.TRAIN_GUIDANCE, generator=generator, output_type="latent")
        captured.handle.remove()
        inputs, velocity = captured.calls[0]
        noisy = flux_model.unpack(inputs["hidden_states"], 8, 8)
        encoded = family.encode_text(components.text_encoders, components.tokenizers, ["photo of sks dog"],
                                     valid_config(name), torch.device("cpu"), lambda message: None)
        ours = family.predict(components.denoiser, noisy, inputs["timestep"] * 1000.0, encoded, [],
                              torch.device("cpu"), torch.float32)
    assert (inputs["guidance"] is not None) == (name == "flux-dev")
    assert torch.allclose(ours, flux_model.unpack(velocity, 8, 8), atol=1e-6)


def test_negative_sample_prompts_are_refused_not_ignored() -> None:
    pipeline = build_pipeline(tiny("flux-dev"), "euler")
    with pytest.raises(ConfigError, match="without negative prompts"):
        pipeline(prompt="a dog", negative_prompt="blurry", guidance_scale=3.5, num_inference_steps=1)


# --- files and folders -----------------------------------------------------------------------------------------

def with_t5_tokenizer(folder: Path) -> Path:
    """The tiny T5 tokenizer beside a model (standalone, T5's tokenizer comes from the model's own folder)."""
    shutil.copytree(tiny_t5_tokenizer().name_or_path, folder / "tokenizer_2", dirs_exist_ok=True)
    return folder


@pytest.mark.parametrize("name", VARIANTS)
def test_all_in_one_file_loads_as_the_same_variant(name: str, tmp_path: Path) -> None:
    metadata = {CONFIGS_METADATA_KEY: json.dumps(tiny_configs(name))}
    path = export_checkpoint(tiny(name), with_t5_tokenizer(tmp_path) / f"{name}.safetensors", metadata=metadata)
    prefixes = {key.split(".", 2)[0] + "." + key.split(".", 2)[1] for key in checkpoint_state_dict(tiny(name))}
    assert {"model.diffusion_model", "text_encoders.clip_l", "text_encoders.t5xxl"} <= prefixes
    loaded = load_source(path)
    assert (loaded.family, loaded.prediction_type) == (name, "flow_matching")
    original = tiny(name).denoiser.state_dict()
    assert all(torch.equal(value, original[key]) for key, value in loaded.denoiser.state_dict().items())


def test_transformer_file_takes_its_parts_from_the_host_folders(tmp_path: Path) -> None:
    """Forge's layout: the transformer in models/Stable-diffusion, clip_l and t5xxl in models/text_encoder, ae in
    models/VAE; the model created from it trains on exactly those weights."""
    components = tiny("flux-dev")
    state = checkpoint_state_dict(components)
    layout = Layout.under(tmp_path / "models").ensure()
    for folder in ("text_encoder", "VAE"):
        (layout.models_dir / folder).mkdir()
    from safetensors.torch import save_file

    parts = {"Stable-diffusion/flux1-dev.safetensors": "model.diffusion_model.",
             "text_encoder/clip_l.safetensors": "text_encoders.clip_l.transformer.",
             "text_encoder/t5xxl_fp16.safetensors": "text_encoders.t5xxl.transformer.",
             "VAE/ae.safetensors": "first_stage_model."}
    for relative, prefix in parts.items():
        metadata = {CONFIGS_METADATA_KEY: json.dumps(tiny_configs("flux-dev"))}
        save_file({key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)},
                  str(layout.models_dir / relative), metadata=metadata if "diffusion" in prefix else None)
    source = with_t5_tokenizer(layout.checkpoints_dir) / "flux1-dev.safetensors"
    model = create_model(ModelStore(layout), "mine", source)
    loaded = load_components(model.working)
    assert loaded.family == "flux-dev" and model.load_config().method == "lora"
    clip = components.text_encoders[0].state_dict()
    assert all(torch.equal(value, clip[key]) for key, value in loaded.text_encoders[0].state_dict().items())


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no float8_e4m3fn")
def test_fp8_t5_file_stays_fp8_in_the_created_model(tmp_path: Path) -> None:
    """A t5xxl_fp8_e4m3fn file is copied into the working folder as fp8 (half of bf16's disk and memory; a
    released T5-XXL is 4.8 GB so), and loads back in the asked dtype with the file's values."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    components = tiny("flux-dev")
    state = checkpoint_state_dict(components)
    layout = Layout.under(tmp_path / "models").ensure()
    (layout.models_dir / "text_encoder").mkdir()
    prefix = "text_encoders.t5xxl.transformer."
    t5_file = {key[len(prefix):]: value.to(torch.float8_e4m3fn) for key, value in state.items()
               if key.startswith(prefix)}
    save_file(t5_file, str(layout.models_dir / "text_encoder" / "t5xxl_fp8_e4m3fn.safetensors"))
    others = {key: value for key, value in state.items() if not key.startswith(prefix)}
    source = with_t5_tokenizer(layout.checkpoints_dir) / "flux1-dev.safetensors"
    save_file(others, str(source), metadata={CONFIGS_METADATA_KEY: json.dumps(tiny_configs("flux-dev"))})
    model = create_model(ModelStore(layout), "mine", source)
    with safe_open(str(model.working / "text_encoder_2" / "model.safetensors"), "pt") as stored:
        assert {stored.get_slice(key).get_dtype() for key in stored.keys()} == {"F8_E4M3"}
    loaded = load_components(model.working, torch.bfloat16).text_encoders[1].state_dict()
    assert {value.dtype for value in loaded.values()} <= {torch.bfloat16, torch.float32}  # T5 may keep `wo` in fp32
    assert all(torch.equal(loaded[key].float(), value.float()) for key, value in t5_file.items())


@pytest.mark.parametrize("name", VARIANTS)
def test_working_folder_without_family_file_is_detected(name: str, tmp_path: Path) -> None:
    working = save_components(tiny(name), tmp_path / "working")
    (working / "family.json").unlink()
    loaded = load_diffusers_folder(working)
    assert (loaded.family, loaded.prediction_type) == (name, "flow_matching")


# --- LoRA ------------------------------------------------------------------------------------------------------

def test_lora_keys_name_the_fused_original_layers() -> None:
    components = tiny_components("flux-dev", seed=0)
    config = valid_config("flux-dev", lora_rank=2, lora_alpha=2.0)
    lora.add_lora(components, config)
    keys = {key.split(".")[0] for key in lora.host_tensors(components)}
    original = flux_names.to_original(tiny("flux-dev").denoiser.state_dict(), components.denoiser.config)
    layers = {key.removesuffix(".weight") for key in original if key.endswith(".weight")}
    assert {key for key in keys if key.startswith("lora_unet_")} == {
        flux_names.lora_key(layer) for layer in layers if layer.startswith(("double_blocks", "single_blocks"))
        and not layer.endswith(("norm.query_norm", "norm.key_norm"))}
    assert {key.split("_text_model")[0] for key in keys if not key.startswith("lora_unet_")} == {"lora_te1"}
    markers = get_family("flux-dev").lora_markers()
    assert markers["ss_base_model_version"] == "flux1" and markers["ss_network_module"] == "networks.lora_flux"


@pytest.mark.parametrize(("name", "t5_tokens"), [("flux-dev", 512), ("flux-schnell", 256)])
def test_activation_memory_is_counted_from_the_released_shapes(name: str, t5_tokens: int) -> None:
    from dreambooth.families.flux_model import memory_facts

    counted = memory_facts(name, t5_tokens)
    assert get_family(name).activation_gib == pytest.approx(counted["activation_bytes"] / 1024 ** 3, abs=0.01)
    assert get_family(name).checkpointing_factor == pytest.approx(counted["checkpointing_factor"])
