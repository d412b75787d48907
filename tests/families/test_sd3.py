"""SD3 / SD 3.5: real-architecture single-file layouts on meta tensors (SD3 Medium, SD 3.5 Medium and Large),
the tiny model's round trips through single files, separate text-encoder files and diffusers folders, and the
text conditioning the transformer trains on (the sampling pipeline's own, T5 or its zeros)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from dreambooth.config.schema import TrainingConfig
from dreambooth.errors import ModelError
from dreambooth.families import get_family
from dreambooth.families.mmdit_table import to_original
from dreambooth.families.sd3 import SD3, T5_TOKENS, T5_WIDTH, transformer_config
from dreambooth.models.components import Components, build_pipeline, save_components
from dreambooth.models.export import checkpoint_state_dict, export_checkpoint, model_to_ldm
from dreambooth.models.loading import CONFIGS_METADATA_KEY, load_checkpoint, load_diffusers_folder
from dreambooth.models.tiny import tiny_components, tiny_configs
from dreambooth.models.tokenizer import copy_t5_tokenizer

VARIANTS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
PREFIX = "model.diffusion_model."


@functools.cache
def meta_transformer(variant: str) -> Any:
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel.from_config(SD3.variant_configs()[variant])


@functools.cache
def meta_original(variant: str) -> dict[str, torch.Tensor]:
    model = meta_transformer(variant)
    return to_original(model.state_dict(), model.config)


@functools.cache
def tiny(with_t5: bool = True) -> Components:
    components = tiny_components("sd3", seed=0, optional_encoders=with_t5)
    if with_t5 and components.text_encoders[2] is None:
        pytest.skip("no sentencepiece here: the tiny T5 tokenizer cannot be built")
    return components


# --- real layouts on meta tensors -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_real_layout_goes_back_through_diffusers_converter_unchanged(variant: str) -> None:
    """Our single-file layout read by diffusers' own single-file converter gives every weight back, same shape."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    model = meta_transformer(variant)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(meta_original(variant)))
    ours = model.state_dict()
    assert set(back) == set(ours)
    assert all(tuple(back[key].shape) == tuple(ours[key].shape) for key in ours)


@pytest.mark.parametrize("variant", VARIANTS)
def test_real_layout_tells_its_release(variant: str) -> None:
    """The config read from a file's shapes is the release's; the keys hosts test are where they look."""
    original = meta_original(variant)
    shapes = {key: tuple(value.shape) for key, value in original.items()}
    config = SD3.variant_configs()[variant]
    expected = {**config, "dual_attention_layers": config.get("dual_attention_layers", []),
                "qk_norm": config.get("qk_norm")}
    assert transformer_config(shapes) == expected
    width = config["caption_projection_dim"]
    assert shapes[f"{PREFIX}joint_blocks.0.x_block.attn.qkv.weight"] == (3 * width, width)
    last = config["num_layers"] - 1
    assert f"{PREFIX}joint_blocks.{last}.context_block.attn.proj.weight" not in shapes  # context_pre_only
    assert (f"{PREFIX}joint_blocks.0.x_block.attn2.qkv.weight" in shapes) == bool(config.get("dual_attention_layers"))
    assert (f"{PREFIX}joint_blocks.0.x_block.attn.ln_q.weight" in shapes) == ("qk_norm" in config)
    assert shapes[f"{PREFIX}x_embedder.proj.weight"] == (width, 16, 2, 2)


def test_diffusers_detects_the_releases_from_our_layout() -> None:
    """diffusers' model-type detection (what SD.Next and diffusers' single-file loading use) on our keys."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    found = {variant: infer_diffusers_model_type(meta_original(variant)) for variant in VARIANTS}
    assert found["sd3-medium"] == "sd3" and found["sd3.5-large"] == "sd35_large"
    assert found["sd3.5-medium"] in ("sd35_medium", "sd3")  # diffusers 0.31 has no SD 3.5 Medium type yet


def test_real_text_encoders_are_under_the_keys_a1111_checks() -> None:
    """A1111 1.10 (modules/models/sd3/sd3_cond.py) loads a text encoder from the file only when its
    position-embedding (CLIP) or embed_tokens (T5) key is there, else it downloads one."""
    import transformers

    configs = SD3.shipped_configs()
    with torch.device("meta"):
        encoders = [transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig.from_dict(configs[name]))
                    for name in ("text_encoder", "text_encoder_2")]
        encoders.append(transformers.T5EncoderModel(transformers.T5Config.from_dict(configs["text_encoder_3"])))
    components = Components(family="sd3", denoiser=meta_transformer("sd3-medium"), vae=None, text_encoders=encoders,
                            tokenizers=[None] * 3, noise_scheduler=None)
    from dreambooth.models.export import text_encoders_to_ldm

    keys = set(text_encoders_to_ldm(components))
    assert {"text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight",
            "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight",
            "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight",
            "text_encoders.t5xxl.transformer.shared.weight",
            "text_encoders.clip_g.transformer.text_projection.weight"} <= keys
    assert "text_encoders.clip_l.transformer.text_projection.weight" not in keys  # diffusers' identity stand-in
    layers = {key.split(".")[6] for key in keys if key.startswith("text_encoders.clip_g.transformer.text_model.encoder")}
    assert len(layers) == 32


# --- the tiny model: files, folders, text encoders ------------------------------------------------------------------

def _export(components: Components, folder: Path, with_tokenizer: bool = True) -> Path:
    metadata = {CONFIGS_METADATA_KEY: json.dumps(tiny_configs("sd3"))}
    path = export_checkpoint(components, folder / "sd3.safetensors", metadata=metadata)
    if with_tokenizer and components.tokenizers[2] is not None:
        copy_t5_tokenizer(components.tokenizers[2], folder / "tokenizer_3")
    return path


def test_single_file_round_trip_keeps_every_weight(tmp_path: Path) -> None:
    components = tiny()
    loaded = load_checkpoint(_export(components, tmp_path))
    before, after = checkpoint_state_dict(components), checkpoint_state_dict(loaded)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (loaded.family, loaded.prediction_type) == ("sd3", "flow_matching")


def test_text_encoders_from_separate_files_in_the_host_folder(tmp_path: Path) -> None:
    """A transformer-and-VAE file plus clip_l/clip_g/t5xxl files (any names) in models/text_encoder."""
    components = tiny()
    full = checkpoint_state_dict(components)
    models = tmp_path / "models"
    folder = models / "text_encoder"
    folder.mkdir(parents=True)
    for name, prefix in (("a.safetensors", "text_encoders.clip_g.transformer."),
                         ("b.safetensors", "text_encoders.clip_l.transformer."),
                         ("t5xxl_fp16.safetensors", "text_encoders.t5xxl.transformer.")):
        save_file({key[len(prefix):]: value for key, value in full.items() if key.startswith(prefix)}, folder / name)
    bare = {key: value for key, value in full.items() if not key.startswith("text_encoders.")}
    checkpoints = models / "Stable-diffusion"
    checkpoints.mkdir()
    save_file(bare, checkpoints / "sd3.safetensors", metadata={CONFIGS_METADATA_KEY: json.dumps(tiny_configs("sd3"))})
    copy_t5_tokenizer(components.tokenizers[2], checkpoints / "tokenizer_3")
    loaded = load_checkpoint(checkpoints / "sd3.safetensors", models_dir=models)
    again = checkpoint_state_dict(loaded)
    assert all(torch.equal(again[key], full[key]) for key in full)


def test_missing_required_text_encoder_names_the_folders(tmp_path: Path) -> None:
    full = checkpoint_state_dict(tiny(with_t5=False))
    bare = {key: value for key, value in full.items() if not key.startswith("text_encoders.clip_g.")}
    save_file(bare, tmp_path / "sd3.safetensors", metadata={CONFIGS_METADATA_KEY: json.dumps(tiny_configs("sd3"))})
    with pytest.raises(ModelError, match=r"holds no clip_g text encoder and none of .* \(a CLIP text model of width 48"):
        load_checkpoint(tmp_path / "sd3.safetensors", models_dir=tmp_path / "models")


def test_without_t5_the_model_loads_and_conditions_on_zeros(tmp_path: Path) -> None:
    components = load_checkpoint(_export(tiny(with_t5=False), tmp_path))
    assert components.text_encoders[2] is None and components.tokenizers[2] is None
    encoded = SD3.encode_text(components.text_encoders, components.tokenizers, ["a photo of sks dog"],
                              TrainingConfig(model_family="sd3", prediction_type="flow_matching"),
                              torch.device("cpu"), lambda text: None)
    assert encoded.hidden.shape == (1, 77 + T5_TOKENS, T5_WIDTH) and encoded.pooled.shape == (1, 80)
    assert not encoded.hidden[:, 77:].any() and not encoded.hidden[:, :77, 80:].any()  # CLIP widths 32 + 48
    assert encoded.hidden[:, :77, :80].any()


def test_t5_weights_without_a_tokenizer_name_the_missing_files(tmp_path: Path) -> None:
    path = _export(tiny(), tmp_path, with_tokenizer=False)
    with pytest.raises(ModelError, match=r"T5's tokenizer is missing: none of .*tokenizer_3.* holds tokenizer.json "
                                         r"or spiece.model"):
        load_checkpoint(path)


def test_diffusers_folder_with_and_without_t5(tmp_path: Path) -> None:
    for with_t5 in (True, False):
        working = save_components(tiny(with_t5), tmp_path / f"folder-{with_t5}")
        (working / "family.json").unlink()
        index = json.loads((working / "model_index.json").read_text())
        assert (index["text_encoder_3"][0] is None) is not with_t5
        loaded = load_diffusers_folder(working)
        assert loaded.family == "sd3" and (loaded.text_encoders[2] is None) is not with_t5


def test_training_conditioning_is_the_sampling_pipelines(tmp_path: Path) -> None:
    """What training feeds the transformer equals StableDiffusion3Pipeline.encode_prompt for the same captions."""
    components = tiny()
    captions = ["a photo of sks dog", "a red cat sitting on the moon"]
    config = TrainingConfig(model_family="sd3", prediction_type="flow_matching")
    pipeline = build_pipeline(components, "euler")
    with torch.no_grad():
        encoded = SD3.encode_text(components.text_encoders, components.tokenizers, captions, config,
                                  torch.device("cpu"), lambda text: None)
        hidden, _, pooled, _ = pipeline.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None,
                                                      do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
    torch.testing.assert_close(encoded.hidden, hidden)
    torch.testing.assert_close(encoded.pooled, pooled)


def test_transformer_export_is_the_converters_inverse() -> None:
    """Every tiny weight exported and read back by diffusers' converter is bit-identical."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    denoiser = tiny(with_t5=False).denoiser
    exported = {key: value for key, value in model_to_ldm(tiny(with_t5=False)).items() if key.startswith(PREFIX)}
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(exported))
    ours = denoiser.state_dict()
    assert set(back) == set(ours) and all(torch.equal(back[key], ours[key]) for key in ours)


def test_family_is_registered_with_flow_matching_defaults() -> None:
    family = get_family("sd3")
    defaults = family.config_defaults()
    assert defaults["prediction_type"] == "flow_matching" and defaults["sample_scheduler"] == "euler"
    assert family.scheduler_config()["shift"] == TrainingConfig().flow_shift == 3.0


def test_our_export_without_t5_loads_back(tmp_path: Path) -> None:
    """An export without T5 embeds the configs of the parts it holds (none for T5); loading it back still looks
    for a separate T5 (found in a real A1111 1.10.1: the create of our SD3 Medium export failed with KeyError
    'text_encoder_3')."""
    components = tiny(with_t5=False)
    path = export_checkpoint(components, tmp_path / "Stable-diffusion" / "sd3m.safetensors")
    assert "text_encoder_3" not in json.loads(_metadata(path)[CONFIGS_METADATA_KEY])
    loaded = load_checkpoint(path, models_dir=tmp_path)
    assert loaded.text_encoders[2] is None
    before, after = checkpoint_state_dict(components), checkpoint_state_dict(loaded)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}
