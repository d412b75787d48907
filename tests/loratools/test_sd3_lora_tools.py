"""The LoRA tools on SD3 LoRA files in the original (kohya) spelling: extract writes them from a trained model
(q/k/v fused as training writes them), resize and LoRA-to-LoRA merge read them without a model, and all write them
as SD3's loaders need (no `.alpha` keys: A1111 1.10 fails on them; the strength folded into the up weights),
keeping each layer's change; the tools that need the model's key table say that they do not support SD3 yet
(merging into a checkpoint does not need it: test_file_merge.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_helpers import write_transformer_lora
from safetensors import safe_open

from dreambooth.errors import ModelError
from dreambooth.loratools.extract import RankRule
from dreambooth.loratools.jobs import merge_to_lora, resize
from dreambooth.loratools.read import components_key_table, guess_family, load_lora
from dreambooth.models.tiny import tiny_components
from dreambooth.store import Layout

pytest.importorskip("diffusers")


def write_sd3_lora(path: Path, seed: int, family: str = "sd3") -> Path:
    """A LoRA of ours on the tiny SD3 model (transformer, CLIP-L, CLIP-G) with random adapters, alpha != rank."""
    write_transformer_lora(path, seed, family)
    return path


def changes(path: Path) -> dict[str, torch.Tensor]:
    """Each layer's change at weight 1 as the loaders apply it, and the file's keys checked for SD3's form."""
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
        assert not any(key.endswith(".alpha") for key in keys)
        assert any(key.startswith("lora_unet_joint_blocks_") for key in keys)
        assert handle.metadata()["ss_base_model_version"] == "sd3"
    return {key: module.delta() for key, module in load_lora(path).modules.items()}


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout.under(tmp_path / "models").ensure()
    write_sd3_lora(layout.lora_dir / "first.safetensors", seed=1)
    write_sd3_lora(layout.lora_dir / "second.safetensors", seed=2)
    return layout


def test_sd3_lora_is_recognised_by_its_keys() -> None:
    assert guess_family({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": None,
                         "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": None}, {}) == "sd3"
    assert guess_family({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": None}, {}) == "flux-dev"


def test_resize_at_full_rank_keeps_every_change(layout: Layout) -> None:
    source = changes(layout.lora_dir / "first.safetensors")
    result = resize(layout, "first.safetensors", RankRule("fixed", 64))
    resized = changes(result.path)
    assert resized.keys() == source.keys()
    for key, change in source.items():
        torch.testing.assert_close(resized[key], change, atol=1e-5, rtol=1e-4)


def test_resize_to_rank_one_lowers_every_rank(layout: Layout) -> None:
    result = resize(layout, "first.safetensors", RankRule("fixed", 1))
    assert {module.rank for module in load_lora(result.path).modules.values()} == {1}


def test_merged_lora_applies_the_weighted_sum(layout: Layout) -> None:
    first, second = changes(layout.lora_dir / "first.safetensors"), changes(layout.lora_dir / "second.safetensors")
    result = merge_to_lora(layout, [("first.safetensors", 1.0), ("second.safetensors", 0.5)])
    merged = changes(result.path)
    for key, change in first.items():
        torch.testing.assert_close(merged[key], change + 0.5 * second[key], atol=1e-5, rtol=1e-4)


def test_extract_gives_each_fused_layer_the_trained_change(tmp_path: Path) -> None:
    import copy

    from lora_helpers import add_known_changes

    from dreambooth.families.mmdit_table import fused_modules
    from dreambooth.loratools.extract import extract_lora
    from dreambooth.loratools.files import save_lora

    base = tiny_components("sd3", seed=0, optional_encoders=False)
    trained = copy.deepcopy(base)
    known = add_known_changes(trained, rank=2, with_conv=False)
    extracted, report = extract_lora(trained, base, RankRule("fixed", 2))
    assert report.total_fraction == pytest.approx(1.0, abs=1e-6)
    path = save_lora(extracted, tmp_path / "extracted.safetensors", "sd3")
    found = changes(path)
    for original, parts in fused_modules(base.denoiser.config).items():
        key = "lora_unet_" + original.replace(".", "_")
        if all(f"transformer.{part}" in known for part in parts):
            stacked = torch.cat([known[f"transformer.{part}"] for part in parts], dim=0)
            torch.testing.assert_close(found.pop(key), stacked, atol=1e-5, rtol=1e-4)
    text = {key: change for key, change in known.items() if key.startswith(("lora_te1_", "lora_te2_"))}
    assert text and found.keys() == text.keys()  # every transformer key checked above, the CLIP layers left
    for key, change in text.items():
        torch.testing.assert_close(found[key], change, atol=1e-5, rtol=1e-4)


def test_a_flux_lora_resizes_with_its_alphas_and_markers(tmp_path: Path) -> None:
    """Flux's kohya files keep `.alpha` (its loaders read them); the output says it is a Flux LoRA."""
    layout = Layout.under(tmp_path / "models").ensure()
    source = load_lora(write_sd3_lora(layout.lora_dir / "flux.safetensors", seed=1, family="flux-dev"))
    resized_path = resize(layout, "flux.safetensors", RankRule("fixed", 64)).path
    with safe_open(str(resized_path), "pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == "flux-1-dev/lora"
        assert sum(key.endswith(".alpha") for key in handle.keys()) == len(source.modules)
    resized = load_lora(resized_path).modules
    for key, module in source.modules.items():
        torch.testing.assert_close(resized[key].delta(), module.delta(), atol=1e-5, rtol=1e-4)


def test_tools_that_need_the_key_table_say_sd3_is_read_in_the_kohya_spelling_only(tmp_path: Path) -> None:
    """Starting training from an SD3 LoRA and the diffusers spelling need the key table, which SD3 has not got:
    the message says so (and that merging into a checkpoint works), for the table and for a diffusers file."""
    from safetensors.torch import save_file

    with pytest.raises(ModelError, match="kohya spelling only.*merged into a checkpoint; starting training"):
        components_key_table(tiny_components("sd3", seed=0, optional_encoders=False))
    diffusers_file = tmp_path / "diffusers.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(1, 4),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(4, 1)}, str(diffusers_file))
    with pytest.raises(ModelError, match="diffusers/peft spelling are not supported"):
        load_lora(diffusers_file)
