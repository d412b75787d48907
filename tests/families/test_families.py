"""The contract every registered model family keeps, checked on its tiny model.

Detection round trips (export -> detect, working folder -> detect), the checkpoint table and the LoRA
key table agree on every UNet and text-encoder module, text encoding and added conditioning drive
the family's own UNet, and the markers hosts read come back as the variant that wrote them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dreambooth.config.schema import TrainingConfig
from dreambooth.errors import ModelError
from dreambooth.families import (
    FAMILY_NAMES,
    architecture_of,
    detect_family,
    get_family,
    resolve_family,
    zero_terminal_snr_of,
)
from dreambooth.families.tables import HOST_TEXT_ROOTS, UNET_PREFIX
from dreambooth.models.components import Components, load_components, save_components
from dreambooth.models.export import checkpoint_metadata, checkpoint_state_dict, export_checkpoint
from dreambooth.models.loading import CONFIGS_METADATA_KEY, load_checkpoint, load_diffusers_folder
from dreambooth.models.tiny import tiny_components, tiny_configs
from dreambooth.models.tokenizer import copy_t5_tokenizer
from dreambooth.train import lora, lora_keys
from dreambooth.train.data.batching import BatchItem
from dreambooth.train.data.scan import ImageRecord

# Families whose denoiser is a UNet (the kohya/ldm LoRA and checkpoint tables, DDPM schedules, UNet conditioning);
# transformer families have their own tests (tests/families/test_sd3.py, tests/families/test_flux_family.py).
UNET_FAMILIES = [name for name in FAMILY_NAMES if get_family(name).denoiser_folder == "unet"]
# Families whose single file loads on its own: a required T5 (Flux) needs its tokenizer beside the file, which
# test_flux_family.py provides.
SELF_CONTAINED_FAMILIES = [name for name in FAMILY_NAMES
                           if all(spec.optional or spec.layout != "t5" for spec in get_family(name).text_encoders)]


@functools.cache
def tiny(family: str) -> Components:
    """Shared tiny model of a family; tests never change it."""
    return tiny_components(family, seed=0)


@functools.cache
def exported(family: str) -> dict[str, torch.Tensor]:
    return checkpoint_state_dict(tiny(family), "fp32")


def underscored_modules(checkpoint: dict[str, torch.Tensor], root: str) -> dict[str, str]:
    """Host-style module names (dots as '_') of a checkpoint's keys under `root` -> their full key prefix."""
    return {key[len(root):].rpartition(".")[0].replace(".", "_"): key.rpartition(".")[0]
            for key in checkpoint if key.startswith(root)}


def test_registry_lists_every_family_once_and_the_schema_offers_them() -> None:
    assert len(set(FAMILY_NAMES)) == len(FAMILY_NAMES) >= 4
    assert all(get_family(name).name == name for name in FAMILY_NAMES)
    choices = TrainingConfig.__dataclass_fields__["model_family"].metadata["choices"]
    assert tuple(choices) == FAMILY_NAMES
    with pytest.raises(ModelError, match="sd1"):
        get_family("sd9")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_schedule_and_defaults_follow_the_family(name: str) -> None:
    family = get_family(name)
    assert type(family.make_noise_scheduler()).__name__ == family.scheduler_class
    if family.prediction_type == "flow_matching":
        assert family.make_noise_scheduler().config.num_train_timesteps == 1000
    else:
        assert family.make_noise_scheduler().config.prediction_type == family.prediction_type
        assert family.make_noise_scheduler("v_prediction").config.prediction_type == "v_prediction"
    defaults = family.config_defaults()
    config = TrainingConfig(**defaults)
    assert (config.model_family, config.prediction_type, config.resolution) == (name, family.prediction_type,
                                                                                family.resolution)
    assert config.zero_terminal_snr == family.zero_terminal_snr
    if family.prediction_type != "flow_matching":  # flow matching reaches pure noise at t = 1 by construction
        assert family.make_noise_scheduler().config.rescale_betas_zero_snr == family.zero_terminal_snr
        assert family.make_noise_scheduler(zero_terminal_snr=True).alphas_cumprod[-1] == 0


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_guide_reads_sizes_and_limits_from_the_family(name: str) -> None:
    """What the memory estimate, presets, wizard and pre-flight need of a family, complete and consistent."""
    family = get_family(name)
    low, high = family.resolution_range
    assert low <= family.resolution <= high and family.resolution % family.pixel_multiple == 0
    assert family.activation_gib > 0
    counts = family.parameter_counts()
    assert tuple(counts) == family.component_folders() and set(counts) == set(family.shipped_configs())
    assert all(count > 1e7 for count in counts.values())
    per_rank = family.lora_parameters_per_rank()
    assert set(per_rank) == {family.denoiser_folder, *(encoder.folder for encoder in family.text_encoders)}
    frozen = {encoder.folder for encoder in family.text_encoders if not encoder.trainable}  # T5-XXL never trains
    assert all(0 < width < counts[part] / 100 for part, width in per_rank.items() if part not in frozen)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_export_then_detect_gives_the_family(name: str) -> None:
    """The exported keys, the metadata and the side files (what hosts read) tell the family."""
    components = tiny(name)
    keys = list(exported(name))
    family = get_family(name)
    assert architecture_of(keys).architecture == family.architecture
    metadata = checkpoint_metadata(components, None)
    assert detect_family(keys, metadata) is family
    yaml = family.side_files(components.prediction_type).get(".yaml")
    assert detect_family(keys, yaml_text=yaml) is family  # without our metadata: as a host sees it
    found, prediction = resolve_family(keys, {}, yaml, None, None)
    assert (found, prediction) == (family, family.prediction_type)


@pytest.mark.parametrize("name", SELF_CONTAINED_FAMILIES)
def test_exported_file_loads_as_the_same_family(name: str, tmp_path: Path) -> None:
    metadata = {CONFIGS_METADATA_KEY: json.dumps(tiny_configs(name))}
    path = export_checkpoint(tiny(name), tmp_path / f"{name}.safetensors", metadata=metadata)
    for spec, tokenizer in zip(get_family(name).text_encoders, tiny(name).tokenizers, strict=True):
        if spec.layout == "t5" and tokenizer is not None:  # T5's tokenizer lies beside the file (none is shipped)
            copy_t5_tokenizer(tokenizer, tmp_path / spec.tokenizer_folder)
    for side in get_family(name).side_files(tiny(name).prediction_type):
        assert path.with_suffix(side).is_file()
    loaded = load_checkpoint(path)
    assert (loaded.family, loaded.prediction_type) == (name, tiny(name).prediction_type)
    assert set(checkpoint_state_dict(loaded)) == set(exported(name))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_working_folder_without_family_file_is_detected(name: str, tmp_path: Path) -> None:
    """A plain diffusers folder (our working folder without family.json) detects as the family."""
    working = save_components(tiny(name), tmp_path / "working")
    (working / "family.json").unlink()
    loaded = load_diffusers_folder(working)
    assert (loaded.family, loaded.prediction_type) == (name, tiny(name).prediction_type)


def test_working_folder_keeps_family_and_text_encoders(tmp_path: Path) -> None:
    for name in FAMILY_NAMES:
        working = save_components(tiny(name), tmp_path / name)
        loaded = load_components(working)
        assert loaded.family == name
        assert [type(e).__name__ for e in loaded.text_encoders] == [s.model_class for s in get_family(name).text_encoders]


@pytest.mark.parametrize("name", UNET_FAMILIES)
def test_lora_keys_and_checkpoint_name_the_same_unet_modules(name: str) -> None:
    """Every LoRA target's key resolves (by the host's rules) to the module the checkpoint stores it under."""
    unet = tiny(name).denoiser
    checkpoint = exported(name)
    stored = underscored_modules(checkpoint, UNET_PREFIX)
    mapping = lora_keys.host_layer_mapping(name, unet, list(tiny(name).text_encoders))
    is_sd2 = lora_keys.host_is_sd2(mapping)
    ldm_names = lora_keys.unet_ldm_names(unet, name)
    modules = dict(unet.named_modules())
    for target in lora.unet_target_names(unet, with_conv=True):
        host = lora_keys.resolve_host_key(lora_keys.unet_key(name, target, ldm_names[target]), mapping, is_sd2)
        assert host is not None and host.startswith("diffusion_model_")
        key = stored[host[len("diffusion_model_"):]]
        assert torch.equal(checkpoint[f"{key}.weight"], modules[target].weight), target


def _text_root(prefix: str) -> str:
    return next(root for root in HOST_TEXT_ROOTS if prefix.startswith(root))


@pytest.mark.parametrize("name", UNET_FAMILIES)
def test_lora_keys_and_checkpoint_name_the_same_text_modules(name: str) -> None:
    components = tiny(name)
    checkpoint = exported(name)
    mapping = lora_keys.host_layer_mapping(name, components.denoiser, list(components.text_encoders))
    is_sd2 = lora_keys.host_is_sd2(mapping)
    for index, (spec, encoder) in enumerate(zip(get_family(name).text_encoders, components.text_encoders,
                                                strict=True)):
        stored = underscored_modules(checkpoint, _text_root(spec.ldm_prefix))
        modules = dict(encoder.named_modules())
        for target in lora.text_encoder_target_names(encoder):
            host = lora_keys.resolve_host_key(lora_keys.te_key(name, index, target), mapping, is_sd2)
            assert host is not None, target
            fused = host not in mapping  # q/k/v: the host changes a slice of the fused attention
            key = stored[host.rsplit("_", 2)[0] if fused else host]
            if fused:
                projection = ("q_proj", "k_proj", "v_proj").index(host.rsplit("_", 2)[1] + "_proj")
                stored_weight = checkpoint[f"{key}.in_proj_weight"].chunk(3)[projection]
            else:
                stored_weight = checkpoint[f"{key}.weight"]
            assert torch.equal(stored_weight, modules[target].weight), target


def batch_items(count: int) -> list[BatchItem]:
    record = ImageRecord(path=Path("a.png"), caption="a photo", concept_index=0, is_class=False, mask_path=None,
                         size=(100, 80), content_hash="0")
    return [BatchItem(record=record, bucket=(64, 48), flip=False, crop=(3, 5), seed=index) for index in range(count)]


@pytest.mark.parametrize("name", UNET_FAMILIES)
def test_text_conditioning_drives_the_family_unet(name: str) -> None:
    components = tiny(name)
    family = get_family(name)
    config = TrainingConfig(model_family=name)
    captions = ["a photo of sks dog", "a dog"]
    with torch.no_grad():
        encoded = family.encode_text(components.text_encoders, components.tokenizers, captions, config,
                                     torch.device("cpu"), lambda message: None)
        added = family.added_conditioning(encoded, batch_items(2), torch.device("cpu"), encoded.hidden.dtype)
        unet = components.denoiser
        assert encoded.hidden.shape == (2, 77, unet.config.cross_attention_dim)
        latents = torch.zeros(2, 4, 8, 8)
        out = unet(latents, torch.tensor([10, 10]), encoded.hidden, added_cond_kwargs=added).sample
    assert out.shape == latents.shape
    uses_added = unet.config.addition_embed_type is not None
    assert (added is not None) == uses_added == (encoded.pooled is not None)


def test_sdxl_added_conditioning_is_size_crop_and_target() -> None:
    """time_ids: original size, crop top-left, target size, each height first (SDXL's micro-conditioning)."""
    encoded = SimpleNamespace(pooled=torch.ones(2, 32))
    added = get_family("sdxl").added_conditioning(encoded, batch_items(2), torch.device("cpu"), torch.float32)
    assert added is not None and added["text_embeds"] is encoded.pooled
    assert added["time_ids"].tolist() == [[80.0, 100.0, 5.0, 3.0, 48.0, 64.0]] * 2


def test_sdxl_v_prediction_marker_round_trips(tmp_path: Path) -> None:
    """An SDXL model turned v-prediction exports the `v_pred` key Forge reads; detection reads it back as the
    v-prediction variant, without zero terminal SNR since the `ztsnr` key is not there."""
    base = tiny("sdxl")
    v_model = dataclasses.replace(base, prediction_type="v_prediction")
    keys = list(checkpoint_state_dict(v_model))
    assert "v_pred" in keys and "v_pred" not in exported("sdxl") and "ztsnr" not in keys
    assert resolve_family(keys, {}, None, None, None) == (get_family("sdxlv"), "v_prediction")
    assert zero_terminal_snr_of(get_family("sdxlv"), keys) is False


def test_v_prediction_variant_is_chosen_from_the_yaml() -> None:
    keys = list(exported("sd2"))
    assert detect_family(keys).name == "sd2"
    assert detect_family(keys, yaml_text='model:\n  params:\n    parameterization: "v"\n').name == "sd2v"
    assert detect_family(keys, {"modelspec.prediction_type": "v"}).name == "sd2v"
    with pytest.raises(ModelError, match="sd2 model, not sdxl"):
        resolve_family(keys, {}, None, "sdxl", None)


def test_unknown_text_encoders_are_refused() -> None:
    keys = [f"{UNET_PREFIX}out.2.weight", "first_stage_model.decoder.conv_out.weight", "cond_stage_model.other.x"]
    with pytest.raises(ModelError, match="no text encoder"):
        architecture_of(keys)
