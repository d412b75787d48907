from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dreambooth.errors import ModelError
from dreambooth.models.convert import clip_l_to_ldm, open_clip_to_ldm
from dreambooth.models.export import (
    checkpoint_state_dict,
    export_checkpoint,
    ldm_scheduler_tables,
    precision_loss_fraction,
)
from dreambooth.models.loading import CONFIGS_METADATA_KEY, load_checkpoint, read_checkpoint
from dreambooth.models.tiny import tiny_components, tiny_configs


def _export_tiny(family: str, path: Path, seed: int = 1, **kwargs: object) -> Path:
    components = tiny_components(family, seed=seed)
    metadata = {CONFIGS_METADATA_KEY: json.dumps(tiny_configs(family))}
    return export_checkpoint(components, path, metadata=metadata, **kwargs)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2v", "sdxl"])
def test_import_of_export_is_bit_identical(family: str, tmp_path: Path) -> None:
    original = tiny_components(family, seed=1)
    loaded = load_checkpoint(_export_tiny(family, tmp_path / "model.safetensors"))
    assert (loaded.family, loaded.prediction_type) == (family, original.prediction_type)
    for left, right in zip([original.denoiser, original.vae, *original.text_encoders],
                           [loaded.denoiser, loaded.vae, *loaded.text_encoders], strict=True):
        left_state, right_state = left.state_dict(), right.state_dict()
        assert left_state.keys() == right_state.keys()
        for key, value in left_state.items():
            assert torch.equal(value, right_state[key]) and value.dtype == right_state[key].dtype, key
    for key, value in original.extras.items():
        assert torch.equal(loaded.extras[key], value), key


@pytest.mark.parametrize("family", ["sd1", "sd2v", "sdxl"])
def test_export_of_import_is_the_same_file(family: str, demo_files: dict[str, Path], tmp_path: Path) -> None:
    source_tensors, _ = read_checkpoint(demo_files[family])
    written = export_checkpoint(load_checkpoint(demo_files[family]), tmp_path / "again.safetensors")
    tensors, _ = read_checkpoint(written)
    assert tensors.keys() == source_tensors.keys()
    for key, value in source_tensors.items():
        assert value.dtype == tensors[key].dtype and torch.equal(value, tensors[key]), key


def test_all_three_components_and_tables_are_written(demo_files: dict[str, Path]) -> None:
    tensors, metadata = read_checkpoint(demo_files["sd1"])
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    for prefix in prefixes:
        assert any(key.startswith(prefix) for key in tensors), prefix
    for name, table in ldm_scheduler_tables().items():
        assert tensors[name].dtype == torch.float32 and torch.equal(tensors[name], table)
    assert metadata["dreambooth_family"] == "sd1"


def test_scheduler_tables_match_diffusers_schedule() -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    tables = ldm_scheduler_tables()
    assert torch.allclose(tables["alphas_cumprod"], scheduler.alphas_cumprod, rtol=1e-5)
    assert torch.allclose(tables["betas"], scheduler.betas, rtol=1e-5)


def test_extras_are_copied_byte_for_byte(tmp_path: Path) -> None:
    components = tiny_components("sd1")
    components.extras = {"alphas_cumprod": torch.arange(5, dtype=torch.float16), "model_ema.decay": torch.tensor(0.9999)}
    state = checkpoint_state_dict(components, "fp32")
    assert state["alphas_cumprod"].dtype == torch.float16
    assert torch.equal(state["alphas_cumprod"], components.extras["alphas_cumprod"])
    assert "betas" not in state  # the base file's own tables, not ours, when it has them


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_export_keeps_tables_fp32(precision: str, dtype: torch.dtype, tmp_path: Path) -> None:
    path = export_checkpoint(tiny_components("sd1"), tmp_path / "half.safetensors", precision=precision)
    tensors, _ = read_checkpoint(path)
    assert tensors["model.diffusion_model.out.2.weight"].dtype == dtype
    assert tensors["alphas_cumprod"].dtype == torch.float32


def test_precision_loss_fraction() -> None:
    base = torch.ones(1000)
    tiny_step = base + 1e-6  # below fp16's resolution at 1.0
    big_step = base + 0.1
    assert precision_loss_fraction(tiny_step, base, "fp16") == 1.0
    assert precision_loss_fraction(big_step, base, "fp16") == 0.0
    assert precision_loss_fraction(tiny_step, base, "fp32") == 0.0
    assert precision_loss_fraction(base, base, "bf16") == 0.0


def test_half_precision_export_warns_when_training_change_is_lost(tmp_path: Path) -> None:
    base = tiny_components("sd1")
    trained = tiny_components("sd1")
    with torch.no_grad():
        for parameter in trained.denoiser.parameters():
            parameter.add_(parameter.abs().clamp(min=1e-3) * 1e-5)  # an lr-5e-6-sized update
    warnings: list[str] = []
    export_checkpoint(trained, tmp_path / "half.safetensors", precision="fp16", base=base, warn=warnings.append)
    assert len(warnings) == 1 and "fp32" in warnings[0]
    export_checkpoint(trained, tmp_path / "full.safetensors", precision="fp32", base=base, warn=warnings.append)
    assert len(warnings) == 1


def test_sd2_v_writes_yaml_beside_it(demo_files: dict[str, Path]) -> None:
    yaml = demo_files["sd2v"].with_suffix(".yaml")
    assert 'parameterization: "v"' in yaml.read_text()
    assert not demo_files["sd2"].with_suffix(".yaml").exists()
    assert not demo_files["sd1"].with_suffix(".yaml").exists()


def test_metadata_is_written(tmp_path: Path) -> None:
    path = export_checkpoint(tiny_components("sd1"), tmp_path / "m.safetensors",
                             metadata={"base_model": "v1-5.safetensors", "steps": "800", "settings_hash": "ab12"})
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["base_model"] == "v1-5.safetensors" and metadata["steps"] == "800"
    assert metadata["settings_hash"] == "ab12" and metadata["dreambooth_family"] == "sd1"


def test_bad_suffix_and_precision_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="safetensors"):
        export_checkpoint(tiny_components("sd1"), tmp_path / "model.ckpt")
    with pytest.raises(ModelError, match="precision"):
        export_checkpoint(tiny_components("sd1"), tmp_path / "model.safetensors", precision="fp8")
    assert not list(tmp_path.iterdir())


def _without_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.removeprefix("text_model."): value for key, value in state.items()}


def test_both_text_encoder_key_layouts_export_alike() -> None:
    clip_l = tiny_components("sd1").text_encoders[0].state_dict()
    prefix = "cond_stage_model.transformer."
    with_prefix = clip_l_to_ldm({("text_model." + k).replace("text_model.text_model.", "text_model."): v
                                 for k, v in clip_l.items()}, prefix)
    assert with_prefix == clip_l_to_ldm(_without_prefix(clip_l), prefix)
    assert all(key.startswith(prefix + "text_model.") for key in with_prefix)
    open_clip = tiny_components("sdxl").text_encoders[1].state_dict()
    ldm_prefix = "conditioner.embedders.1.model."
    assert open_clip_to_ldm(open_clip, ldm_prefix).keys() == open_clip_to_ldm(_without_prefix(open_clip),
                                                                              ldm_prefix).keys()


def test_file_without_text_model_prefix_imports(demo_files: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors, metadata = read_checkpoint(demo_files["sd1"])
    renamed = {key.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): value
               for key, value in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(tmp_path / "no-prefix.safetensors"), metadata=metadata)
    loaded = load_checkpoint(tmp_path / "no-prefix.safetensors")
    again, _ = read_checkpoint(export_checkpoint(loaded, tmp_path / "out.safetensors"))
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[key], tensors[key]) for key in tensors)


def test_half_precision_file_round_trips_exactly(tmp_path: Path) -> None:
    first = _export_tiny("sd1", tmp_path / "half.safetensors", precision="fp16")
    second = export_checkpoint(load_checkpoint(first), tmp_path / "again.safetensors", precision="fp16")
    original, _ = read_checkpoint(first)
    again, _ = read_checkpoint(second)
    assert original.keys() == again.keys()
    assert all(original[key].dtype == again[key].dtype and torch.equal(original[key], again[key]) for key in original)


@pytest.mark.parametrize(("family", "precision"), [("sdxlv", "fp16"), ("sd3", "bf16"), ("sd1", "fp32")])
def test_working_folder_exports_the_same_bytes_loaded_in_the_export_precision(family: str, precision: str,
                                                                             tmp_path: Path) -> None:
    """export_working loads the weights straight in the export precision (a third of the memory for a half
    file): every tensor equals the fp32 load cast at export."""
    from dreambooth.models.components import load_components, save_components
    from dreambooth.models.export import export_working

    working = save_components(tiny_components(family, seed=2), tmp_path / "working")
    cast = checkpoint_state_dict(load_components(working), precision)
    written = export_working(working, tmp_path / "out.safetensors", precision)
    with safe_open(str(written), "pt") as handle:
        assert set(handle.keys()) == set(cast)
        for key, value in cast.items():
            loaded = handle.get_tensor(key)
            assert loaded.dtype == value.dtype and torch.equal(loaded, value), key
    with pytest.raises(ModelError, match="fp8"):
        export_working(working, tmp_path / "bad.safetensors", "fp8")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_export_of_a_small_architecture_loads_back_without_help(family: str, tmp_path: Path) -> None:
    """A trained demo model's export carries its configs, so it loads as itself (not as a full-size model)."""
    original = tiny_components(family, seed=2)
    loaded = load_checkpoint(export_checkpoint(original, tmp_path / "trained.safetensors"))
    assert loaded.denoiser.config.block_out_channels == original.denoiser.config.block_out_channels
    for key, value in original.denoiser.state_dict().items():
        assert torch.equal(loaded.denoiser.state_dict()[key], value), key


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_exports_carry_no_configs(family: str) -> None:
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from dreambooth.families import get_family
    from dreambooth.models.components import Components
    from dreambooth.models.export import architecture_metadata

    unit = get_family(family)
    configs = unit.shipped_configs()
    with init_empty_weights():
        unet = getattr(diffusers, unit.denoiser_class).from_config(configs[unit.denoiser_folder])
        vae = getattr(diffusers, unit.vae_class).from_config(configs["vae"])
        encoders = [getattr(transformers, spec.model_class)(transformers.CLIPTextConfig.from_dict(configs[spec.folder]))
                    for spec in unit.text_encoders]
    components = Components(family=family, denoiser=unet, vae=vae, text_encoders=encoders, tokenizers=[],
                            noise_scheduler=unit.make_noise_scheduler())
    assert architecture_metadata(components) == {}
