"""Merging SD3 / SD 3.5 and Flux.1 LoRAs into a checkpoint: done on the checkpoint's own file, tensor by tensor.

Each merged weight must equal what the hosts' LoRA loaders (their rules replayed in sd3_loader_rules.py and
flux_loader_rules.py) make of the base file at the same strength, added in fp32 and rounded once to the file's
precision; every other tensor must keep its bytes; at weight 1 the merge equals the model training adapted; and a
layer missing from the file, a quantized weight and a checkpoint of another family are clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import flux_loader_rules
import pytest
import sd3_loader_rules
import torch
from lora_helpers import write_transformer_lora
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth import cli
from dreambooth.errors import ModelError
from dreambooth.families import get_family
from dreambooth.families.flux_names import inner_dim
from dreambooth.loratools.file_merge import layer_names
from dreambooth.loratools.jobs import merge_to_checkpoint
from dreambooth.models.export import export_checkpoint, model_to_ldm, text_encoder_to_ldm
from dreambooth.models.loading import load_source
from dreambooth.models.tiny import tiny_components
from dreambooth.models.tokenizer import copy_t5_tokenizer
from dreambooth.store import Layout
from dreambooth.train import lora

diffusers = pytest.importorskip("diffusers")
for needed, family in (("SD3Transformer2DModel", "SD3"), ("FluxTransformer2DModel", "Flux")):
    if not hasattr(diffusers, needed):
        pytest.skip(f"this diffusers has no {needed} ({family} needs diffusers 0.30 or newer)",
                    allow_module_level=True)

WEIGHT = 0.7


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def changed_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {key for key in before if not torch.equal(before[key], after[key])}


def assert_untouched_bytes(source: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], patched: set[str]) -> None:
    assert merged.keys() == source.keys()
    for key in set(source) - patched:
        assert merged[key].dtype == source[key].dtype and torch.equal(merged[key], source[key]), key


# --- SD3 ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3_world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny SD3 model (with T5) exported as one fp16 and one fp32 file, and a LoRA of ours on its transformer and
    CLIPs."""
    layout = Layout.under(tmp_path_factory.mktemp("sd3-merge") / "models").ensure()
    base = tiny_components("sd3", seed=0)
    if base.text_encoders[2] is None:
        pytest.skip("no sentencepiece here: the tiny T5 tokenizer cannot be built")
    copy_t5_tokenizer(base.tokenizers[2], layout.checkpoints_dir / "tokenizer_3")  # read when the merge loads back
    for precision in ("fp16", "fp32"):
        export_checkpoint(base, layout.checkpoints_dir / f"sd3-{precision}.safetensors", precision)
    adapted = write_transformer_lora(layout.lora_dir / "sd3-lora.safetensors", seed=1)
    return layout, adapted


def sd3_forge_merge(source: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], strength: float,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The source's weights patched as Forge's (ComfyUI's) key map places each layer: strength * up @ down (no
    alpha: scale 1), added in fp32 and rounded once to `dtype`."""
    key_map = sd3_loader_rules.comfy_key_map(source, depth=2, forge=True)
    matched = sd3_loader_rules.comfy_matches(tensors, key_map)
    assert set(matched) == set(tensors)
    patched = {}
    for key, weight in set(matched.items()):
        if key.endswith(".lora_down.weight"):
            layer = sd3_loader_rules.layer_of(key)
            change = tensors[f"{layer}.lora_up.weight"].float() @ tensors[key].float()
            patched[weight] = (source[weight].float() + strength * change).to(dtype)
    return patched


def test_sd3_merge_equals_forge_applying_the_lora(sd3_world: Any) -> None:
    layout, _ = sd3_world
    result = merge_to_checkpoint(layout, "sd3-fp16.safetensors", [("sd3-lora.safetensors", WEIGHT)], "sd3-merged")
    source = load_file(str(layout.checkpoints_dir / "sd3-fp16.safetensors"))
    merged = load_file(str(result.path))
    expected = sd3_forge_merge(source, lora_tensors(layout.lora_dir / "sd3-lora.safetensors"), WEIGHT, torch.float16)
    assert any(key.startswith("text_encoders.clip_g.") for key in expected)  # both CLIPs and the transformer
    assert changed_keys(source, merged) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=0, msg=key)
    assert_untouched_bytes(source, merged, set(expected))
    assert "fp16" in result.message and result.path.parent == layout.checkpoints_dir


def test_sd3_merge_keeps_the_file_metadata_and_loads_back_as_sd3(sd3_world: Any) -> None:
    layout, _ = sd3_world
    result = merge_to_checkpoint(layout, "sd3-fp16.safetensors", [("sd3-lora.safetensors", WEIGHT)], "sd3-meta")
    with safe_open(str(layout.checkpoints_dir / "sd3-fp16.safetensors"), "pt") as handle:
        own = handle.metadata()
    with safe_open(str(result.path), "pt") as handle:
        metadata = handle.metadata()
    assert {key: metadata[key] for key in own} == own
    assert metadata["dreambooth_tool"] == "merge" and metadata["dreambooth_base"] == "sd3-fp16.safetensors"
    assert json.loads(metadata["dreambooth_merged_loras"]) == [{"name": "sd3-lora.safetensors", "weight": WEIGHT}]
    loaded = load_source(result.path)
    assert loaded.family == "sd3"
    merged = load_file(str(result.path))
    torch.testing.assert_close(model_to_ldm(loaded)["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"],
                               merged["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].float())


def test_sd3_merge_at_weight_one_equals_the_trained_model(sd3_world: Any) -> None:
    """Independent of the loaders' rules: the fp32 merge at weight 1 is the adapted model with peft's merge."""
    layout, adapted = sd3_world
    result = merge_to_checkpoint(layout, "sd3-fp32.safetensors", [("sd3-lora.safetensors", 1.0)], "sd3-one",
                                 precision="fp32")
    trained = copy.deepcopy(adapted)
    lora.merge_lora(trained)
    expected = model_to_ldm(trained)
    merged = load_file(str(result.path))
    source = load_file(str(layout.checkpoints_dir / "sd3-fp32.safetensors"))
    assert changed_keys(source, merged)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_sd3_precision_is_the_output_precision(sd3_world: Any) -> None:
    """An fp16 file merged with precision fp32: the same merged values, every floating tensor in fp32."""
    layout, _ = sd3_world
    half = load_file(str(merge_to_checkpoint(layout, "sd3-fp16.safetensors", [("sd3-lora.safetensors", WEIGHT)],
                                             "sd3-h").path))
    full = load_file(str(merge_to_checkpoint(layout, "sd3-fp16.safetensors", [("sd3-lora.safetensors", WEIGHT)],
                                             "sd3-f", precision="fp32").path))
    assert {value.dtype for value in full.values()} == {torch.float32}
    for key, value in full.items():
        torch.testing.assert_close(value.half(), half[key], rtol=0, atol=0, msg=key)


def test_cli_merges_an_sd3_lora_into_its_checkpoint(sd3_world: Any, capsys: pytest.CaptureFixture[str]) -> None:
    layout, _ = sd3_world
    root = layout.checkpoints_dir.parent.parent
    assert cli.main(["--data-dir", str(root), "lora-merge", "--lora", f"sd3-lora.safetensors:{WEIGHT}", "--into",
                     "sd3-fp16.safetensors", "--out", "sd3-cli"]) == 0
    assert "weights changed" in capsys.readouterr().out
    api = load_file(str(merge_to_checkpoint(layout, "sd3-fp16.safetensors", [("sd3-lora.safetensors", WEIGHT)],
                                            "sd3-job").path))
    made = load_file(str(layout.checkpoints_dir / "sd3-cli.safetensors"))
    assert all(torch.equal(made[key], api[key]) for key in api)


def test_rest_api_merges_an_sd3_lora_and_reports_a_family_mismatch(sd3_world: Any) -> None:
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dreambooth.service import TrainingService
    from dreambooth.store import ModelStore
    from dreambooth.ui.api import register_api

    from fake_host import FakeHost

    layout, _ = sd3_world
    store = ModelStore(layout)
    app = fastapi.FastAPI()
    register_api(app, TrainingService(FakeHost(layout), store), store)
    client = TestClient(app)
    answer = client.post("/dreambooth/lora/merge", json={"loras": [{"name": "sd3-lora.safetensors", "weight": WEIGHT}],
                                                        "into": "sd3-fp16.safetensors", "out": "sd3-api"})
    assert answer.status_code == 201, answer.text
    made = load_file(answer.json()["path"])
    job = load_file(str(merge_to_checkpoint(layout, "sd3-fp16.safetensors", [("sd3-lora.safetensors", WEIGHT)],
                                            "sd3-api-job").path))
    assert all(torch.equal(made[key], job[key]) for key in job)
    write_transformer_lora(layout.lora_dir / "flux-into-sd3.safetensors", seed=2, family="flux-dev", text=False)
    refused = client.post("/dreambooth/lora/merge", json={"loras": [{"name": "flux-into-sd3.safetensors"}],
                                                         "into": "sd3-fp16.safetensors"})
    assert refused.status_code == 400 and "is a Flux.1 dev LoRA, but sd3-fp16.safetensors" in refused.json()["detail"]


def test_sd3_fp8_text_encoder_is_copied_as_it_is(sd3_world: Any) -> None:
    """Stability's SD3 file with T5 in fp8: the LoRA names no T5 weight, so the fp8 tensors are copied unchanged."""
    layout, _ = sd3_world
    tensors = load_file(str(layout.checkpoints_dir / "sd3-fp16.safetensors"))
    t5 = [key for key in tensors if key.startswith("text_encoders.t5xxl.") and key.endswith(".weight")]
    assert t5
    tensors.update({key: tensors[key].to(torch.float8_e4m3fn) for key in t5})
    save_file(tensors, str(layout.checkpoints_dir / "sd3-t5fp8.safetensors"))
    merged = load_file(str(merge_to_checkpoint(layout, "sd3-t5fp8.safetensors", [("sd3-lora.safetensors", 1.0)],
                                               "sd3-t5").path))
    for key in t5:
        assert merged[key].dtype == torch.float8_e4m3fn
        assert torch.equal(merged[key].view(torch.uint8), tensors[key].view(torch.uint8))


# --- Flux -----------------------------------------------------------------------------------------------------

def flux_files(folder: Path, prefix: str, with_clip: bool) -> Path:
    """The tiny Flux dev transformer in the original layout, bf16, with `prefix` (and CLIP-L in an all-in-one)."""
    base = tiny_components("flux-dev", seed=0, optional_encoders=False)
    unit = get_family("flux-dev")
    tensors = {prefix + key.removeprefix("model.diffusion_model."): value for key, value in
               unit.denoiser_to_original(base.denoiser.state_dict(), base.denoiser.config).items()}
    if with_clip:
        tensors.update(text_encoder_to_ldm(unit.text_encoders[0], base.text_encoders[0].state_dict()))
    path = folder / f"flux-{'aio' if with_clip else 'bare' if not prefix else 'transformer'}.safetensors"
    save_file({key: value.to(torch.bfloat16) for key, value in tensors.items()}, str(path), metadata={"own": "kept"})
    return path


def flux_forge_merge(source: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], prefix: str,
                     strength: float) -> dict[str, torch.Tensor]:
    """Forge's Flux key maps and patching (flux_loader_rules) on fp32 copies of the file's weights, rounded once."""
    config = tiny_components("flux-dev", seed=0, optional_encoders=False).denoiser.config
    original = [key.removeprefix(prefix) for key in source if not key.startswith("text_encoders.")]
    unet = flux_loader_rules.unet_key_map(original, config.num_layers, config.num_single_layers, inner_dim(config),
                                          config.guidance_embeds)
    clip = flux_loader_rules.clip_key_map([key.removeprefix("text_encoders.") for key in source
                                           if key.startswith("text_encoders.clip_l.")], [], forge=True)
    assert set(flux_loader_rules.forge_matches(tensors, unet, clip)) == set(tensors)
    weights = {f"diffusion_model.{key}": source[prefix + key].float() for key in original}
    weights.update({key.removeprefix("text_encoders."): value.float() for key, value in source.items()
                    if key.startswith("text_encoders.")})
    before = {key: value.clone() for key, value in weights.items()}
    assert flux_loader_rules.apply(weights, tensors, {**unet, **clip}, strength) == []
    back = {f"diffusion_model.{key}": prefix + key for key in original}
    return {back.get(key, f"text_encoders.{key}"): value.to(torch.bfloat16) for key, value in weights.items()
            if not torch.equal(value, before[key])}


@pytest.mark.parametrize(("prefix", "with_clip"), [("model.diffusion_model.", True), ("model.diffusion_model.", False),
                                                   ("", False)])
def test_flux_merge_equals_forge_applying_the_lora(tmp_path: Path, prefix: str, with_clip: bool) -> None:
    layout = Layout.under(tmp_path / "models").ensure()
    path = flux_files(layout.checkpoints_dir, prefix, with_clip)
    write_transformer_lora(layout.lora_dir / "flux-lora.safetensors", seed=2, family="flux-dev", text=with_clip)
    result = merge_to_checkpoint(layout, path.name, [("flux-lora.safetensors", WEIGHT)], precision="bf16")
    source, merged = load_file(str(path)), load_file(str(result.path))
    expected = flux_forge_merge(source, lora_tensors(layout.lora_dir / "flux-lora.safetensors"), prefix, WEIGHT)
    assert any(".single_blocks." in key or key.startswith("single_blocks.") for key in expected)
    assert any(key.startswith("text_encoders.") for key in expected) == with_clip
    assert changed_keys(source, merged) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=0, msg=key)
    assert_untouched_bytes(source, merged, set(expected))
    with safe_open(str(result.path), "pt") as handle:
        assert handle.metadata()["own"] == "kept"


# --- errors -----------------------------------------------------------------------------------------------------

@pytest.fixture
def flux_layout(tmp_path: Path) -> Layout:
    layout = Layout.under(tmp_path / "models").ensure()
    flux_files(layout.checkpoints_dir, "", with_clip=False)
    write_transformer_lora(layout.lora_dir / "with-clip.safetensors", seed=2, family="flux-dev")
    write_transformer_lora(layout.lora_dir / "transformer.safetensors", seed=2, family="flux-dev", text=False)
    return layout


def test_a_clip_lora_into_a_transformer_only_file_names_the_layer_and_the_file(flux_layout: Layout) -> None:
    with pytest.raises(ModelError, match=r"with-clip.safetensors: text-encoder layer lora_te1_\S+ names no weight "
                                         r"of flux-bare.safetensors"):
        merge_to_checkpoint(flux_layout, "flux-bare.safetensors", [("with-clip.safetensors", 1.0)])
    assert sorted(path.name for path in flux_layout.checkpoints_dir.iterdir()) == ["flux-bare.safetensors"]


@pytest.mark.parametrize("stored", ["fp8", "nf4"])
def test_a_quantized_file_says_to_merge_into_the_full_one(flux_layout: Layout, stored: str) -> None:
    tensors = load_file(str(flux_layout.checkpoints_dir / "flux-bare.safetensors"))
    weight = tensors["double_blocks.0.img_attn.qkv.weight"]
    if stored == "fp8":
        tensors["double_blocks.0.img_attn.qkv.weight"] = weight.to(torch.float8_e4m3fn)
    else:  # Forge's NF4: two 4-bit values per byte, the quantization state beside it
        tensors["double_blocks.0.img_attn.qkv.weight"] = torch.zeros(weight.numel() // 2, 1, dtype=torch.uint8)
        tensors["double_blocks.0.img_attn.qkv.weight.quant_state.bitsandbytes__nf4"] = torch.zeros(8, dtype=torch.uint8)
    save_file(tensors, str(flux_layout.checkpoints_dir / f"flux-{stored}.safetensors"))
    with pytest.raises(ModelError, match=r"double_blocks.0.img_attn.qkv.weight .*quantized.*merge into the bf16/fp16"):
        merge_to_checkpoint(flux_layout, f"flux-{stored}.safetensors", [("transformer.safetensors", 1.0)])


def test_a_lora_of_another_family_is_refused(flux_layout: Layout, tmp_path: Path) -> None:
    write_transformer_lora(flux_layout.lora_dir / "sd3.safetensors", seed=1, family="sd3")
    with pytest.raises(ModelError, match="sd3.safetensors is a SD3 / SD 3.5 LoRA, but flux-bare.safetensors is a "
                                         "Flux.1 dev checkpoint"):
        merge_to_checkpoint(flux_layout, "flux-bare.safetensors", [("sd3.safetensors", 1.0)])
    sd1 = tiny_components("sd1", seed=0)
    export_checkpoint(sd1, flux_layout.checkpoints_dir / "sd1.safetensors", "fp16")
    with pytest.raises(ModelError, match="sd1.safetensors is not an SD3 / SD 3.5 or Flux.1 checkpoint"):
        merge_to_checkpoint(flux_layout, "sd1.safetensors", [("transformer.safetensors", 1.0)])
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 1)},
              str(flux_layout.lora_dir / "sd1-lora.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(ModelError, match="is a SD 1.x LoRA, but flux-bare.safetensors is a Flux.1 dev"):
        merge_to_checkpoint(flux_layout, "flux-bare.safetensors", [("sd1-lora.safetensors", 1.0)])


def test_a_flux_lora_in_the_diffusers_spelling_says_what_is_read(flux_layout: Layout) -> None:
    """Only the kohya spelling names the file's layers; a diffusers/peft Flux file (it has `transformer_blocks` as
    SD3's do) is told apart by its metadata and refused with the reason."""
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(1, 16),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, 1)},
              str(flux_layout.lora_dir / "peft.safetensors"), metadata={"ss_base_model_version": "flux1"})
    with pytest.raises(ModelError, match="Flux.1 dev LoRAs are read in the kohya spelling only"):
        merge_to_checkpoint(flux_layout, "flux-bare.safetensors", [("peft.safetensors", 1.0)])


# --- released layouts: every layer our writers produce lands where Forge puts it (meta tensors) -------------------

@pytest.mark.parametrize("variant", ["sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_every_sd3_layer_of_the_released_layouts_lands_where_forge_puts_it(variant: str) -> None:
    from dreambooth.families.sd3 import SD3

    config = SD3.variant_configs()[variant]
    with torch.device("meta"):
        denoiser = diffusers.SD3Transformer2DModel.from_config(config)
    modules = dict(denoiser.named_modules())
    factors = {name: (torch.zeros(1, modules[name].in_features), torch.zeros(modules[name].out_features, 1))
               for name in SD3.denoiser_lora_targets(denoiser, False)}
    layers = {key.split(".")[0] for key in SD3.denoiser_lora_tensors(factors, denoiser, "original")}
    keys = list(SD3.denoiser_to_original(denoiser.state_dict(), denoiser.config))
    forge = sd3_loader_rules.comfy_key_map(keys, config["num_layers"], forge=True)
    names = layer_names(keys, SD3)
    assert layers and {layer: names.get(layer) for layer in layers} == {layer: forge[layer] for layer in layers}


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
def test_every_flux_layer_of_the_released_layouts_lands_where_forge_puts_it(variant: str, prefix: str) -> None:
    from accelerate import init_empty_weights

    from dreambooth.families import flux_names

    unit = get_family(f"flux-{variant}")
    with init_empty_weights():
        model = diffusers.FluxTransformer2DModel.from_config(unit.shipped_configs()["transformer"])
    slots = flux_names.module_table(model.config)
    layers = {flux_names.lora_key(slots[name].original) for name in flux_names.lora_target_names(model)}
    original = list(flux_names.to_original(model.state_dict(), model.config))
    forge = flux_loader_rules.unet_key_map(original, model.config.num_layers, model.config.num_single_layers,
                                           inner_dim(model.config), model.config.guidance_embeds)
    names = layer_names([prefix + key for key in original], unit)
    assert len(layers) == 19 * 10 + 38 * 3
    assert {layer: names.get(layer) for layer in layers} == {
        layer: prefix + forge[layer][0].removeprefix("diffusion_model.") for layer in layers}


def test_too_little_free_space_is_said_before_writing(flux_layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    from dreambooth.loratools import file_merge

    source = flux_layout.checkpoints_dir / "flux-bare.safetensors"
    monkeypatch.setattr(file_merge, "free_bytes", lambda folder: source.stat().st_size // 2)
    with pytest.raises(ModelError, match=r"needs \d+\.\d MiB, but .*Stable-diffusion has \d+\.\d MiB free"):
        merge_to_checkpoint(flux_layout, "flux-bare.safetensors", [("transformer.safetensors", 1.0)], precision="bf16")
    assert sorted(path.name for path in flux_layout.checkpoints_dir.iterdir()) == ["flux-bare.safetensors"]


def test_the_tab_merges_a_flux_lora_into_its_transformer_file(flux_layout: Layout) -> None:
    pytest.importorskip("gradio")
    from dreambooth.service import TrainingService
    from dreambooth.store import ModelStore
    from dreambooth.ui.tab import DreamboothTab

    from fake_host import FakeHost

    store = ModelStore(flux_layout)
    tab = DreamboothTab(FakeHost(flux_layout), TrainingService(FakeHost(flux_layout), store), store)
    tab.blocks = tab.build()
    assert "flux-bare.safetensors" in tab.lora_tools.checkpoints()
    report, notice = tab.lora_tools.on_merge(["transformer.safetensors"], str(WEIGHT), "flux-bare.safetensors",
                                             "fixed", 8, 128, "tabbed", "bf16")
    assert "weights changed" in report and "Merged" in notice
    job = merge_to_checkpoint(flux_layout, "flux-bare.safetensors", [("transformer.safetensors", WEIGHT)],
                              "job", precision="bf16")
    made, expected = load_file(str(flux_layout.checkpoints_dir / "tabbed.safetensors")), load_file(str(job.path))
    assert made.keys() == expected.keys() and all(torch.equal(made[key], expected[key]) for key in expected)
