"""Exactness of extract, resize and merge on tiny models of every family.

The reference for "what the host renders" is apply_host_lora (A1111 1.10's loader, replayed in
dreambooth/train/lora.py): merging a file at weight w must give the weights that loader gives.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_helpers import add_known_changes, assert_same_weights, fresh, write_trained_lora
from safetensors.torch import load_file

from dreambooth.errors import ModelError
from dreambooth.loratools.extract import RankRule, choose_rank, extract_lora
from dreambooth.loratools.files import lora_tensors, save_lora
from dreambooth.loratools.merge import merge_into_components, merge_loras
from dreambooth.loratools.read import components_key_table, load_lora, read_lora
from dreambooth.loratools.resize import resize_lora
from dreambooth.train import lora

FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_known_rank_reproduces_change(family: str) -> None:
    trained = fresh(family)
    changes = add_known_changes(trained, rank=2, with_conv=True)
    extracted, report = extract_lora(trained, fresh(family), RankRule("fixed", 2), RankRule("fixed", 2))
    assert extracted.modules.keys() == changes.keys()
    for key, change in changes.items():
        torch.testing.assert_close(extracted.modules[key].delta(), change, rtol=1e-4, atol=1e-5, msg=key)
    assert report.total_fraction == pytest.approx(1.0, abs=1e-6)
    assert set(report.by_block().values()) and min(report.by_block().values()) > 1 - 1e-6
    # Merged back into the base, the LoRA gives the trained weights.
    base = fresh(family)
    merge_into_components(base, [(extracted, 1.0)], components_key_table(base))
    assert_same_weights(base, trained)


def test_dynamic_ranks_find_the_true_rank() -> None:
    trained = fresh("sd1")
    add_known_changes(trained, rank=3, with_conv=False)
    for rule in (RankRule("energy", 1.0), RankRule("ratio", 1000.0)):
        extracted, report = extract_lora(trained, fresh("sd1"), rule)
        assert set(report.ranks()) == {3}, rule
    low, report = extract_lora(trained, fresh("sd1"), RankRule("fixed", 1))
    assert set(report.ranks()) == {1} and 0 < report.total_fraction < 0.99


def test_energy_rule_keeps_the_asked_fraction() -> None:
    singular = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(singular, RankRule("energy", 16 / 22)) == 1
    assert choose_rank(singular, RankRule("energy", 0.8)) == 2
    assert choose_rank(singular, RankRule("energy", 0.99)) == 4
    assert choose_rank(singular, RankRule("energy", 0.99, max_rank=3)) == 3
    assert choose_rank(singular, RankRule("ratio", 2.0)) == 2
    assert choose_rank(torch.zeros(3), RankRule("fixed", 2)) == 0
    with pytest.raises(ModelError, match="fraction"):
        RankRule("energy", 2.0).check()


@pytest.mark.parametrize(("family", "kind"), [("sd1", "lora"), ("sd1", "locon"), ("sd2", "locon"),
                                              ("sd2", "dora"), ("sdxl", "locon"), ("sdxl", "dora")])
@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_merge_into_checkpoint_equals_host_loader(family: str, kind: str, weight: float, tmp_path: Path) -> None:
    path = write_trained_lora(family, kind, tmp_path / "lora.safetensors")
    merged = fresh(family)
    changed = merge_into_components(merged, [(load_lora(path), weight)], components_key_table(merged))
    host = fresh(family)
    assert lora.apply_host_lora(host, path, weight) == []
    assert changed > 0
    assert_same_weights(merged, host)


def test_merge_is_w_plus_scaled_up_down(tmp_path: Path) -> None:
    path = write_trained_lora("sd1", "lora", tmp_path / "lora.safetensors")
    tensors = load_file(str(path))
    key = next(key.removesuffix(".alpha") for key in tensors if key.endswith(".alpha") and "attn1_to_q" in key)
    up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
    expected_change = float(tensors[f"{key}.alpha"]) / down.shape[0] * up @ down
    merged, table = fresh("sd1"), components_key_table(fresh("sd1"))
    merge_into_components(merged, [(load_lora(path), 1.0)], table)
    target = table.targets[key]
    before = fresh("sd1").denoiser.get_submodule(target.module).weight
    torch.testing.assert_close(merged.denoiser.get_submodule(target.module).weight, before + expected_change)


def test_dora_scale_files_merge_as_the_host_applies_them(tmp_path: Path) -> None:
    """kohya-style DoRA (lora_down/up + dora_scale): our merge and A1111's weight decomposition agree."""
    source = load_lora(write_trained_lora("sd1", "lora", tmp_path / "plain.safetensors"))
    base = fresh("sd1")
    table = components_key_table(base)
    generator = torch.Generator().manual_seed(5)
    for key, module in source.modules.items():
        weight = lora.model_parts(base)[table.targets[key].part].get_submodule(table.targets[key].module).weight
        columns = weight.detach().transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        module.dora_scale = (columns * (1 + 0.1 * torch.rand(columns.shape, generator=generator))).reshape(
            1, weight.shape[1], *[1] * (weight.dim() - 2))
    path = save_lora(source, tmp_path / "dora.safetensors", "sd1")
    merged, host = fresh("sd1"), fresh("sd1")
    merge_into_components(merged, [(load_lora(path), 1.0)], components_key_table(merged))
    assert lora.apply_host_lora(host, path, 1.0) == []
    assert_same_weights(merged, host)
    with pytest.raises(ModelError, match="dora_scale"):
        merge_loras([(load_lora(path), 1.0)])


@pytest.mark.parametrize(("family", "kind"), [("sd1", "locon"), ("sdxl", "dora")])
def test_resize_at_full_rank_is_lossless(family: str, kind: str, tmp_path: Path) -> None:
    source = load_lora(write_trained_lora(family, kind, tmp_path / "lora.safetensors"))
    full = max(min(module.delta().reshape(module.delta().shape[0], -1).shape) for module in source.modules.values())
    resized, report = resize_lora(source, RankRule("fixed", full))
    for key, module in source.modules.items():
        torch.testing.assert_close(resized.modules[key].delta(), module.delta(), rtol=1e-4, atol=1e-6, msg=key)
    assert report.total_fraction == pytest.approx(1.0, abs=1e-6)


def test_resize_keeps_scale_and_lowers_rank(tmp_path: Path) -> None:
    source = load_lora(write_trained_lora("sd1", "locon", tmp_path / "lora.safetensors"))
    resized, report = resize_lora(source, RankRule("fixed", 1))
    for key, module in resized.modules.items():
        old = source.modules[key]
        assert module.rank == 1 and module.scale == pytest.approx(old.scale)
        # Rank 1 keeps the largest singular direction: the change shrinks, never grows.
        assert module.delta().norm() <= old.delta().norm() * (1 + 1e-5)
    assert 0 < report.total_fraction < 1
    exact, _ = resize_lora(source, RankRule("energy", 1.0))
    assert max(exact.modules[key].rank for key in exact.modules) <= max(m.rank for m in source.modules.values())


@pytest.mark.parametrize("rule", [None, RankRule("fixed", 64)])
def test_merge_loras_sums_changes(rule: RankRule | None, tmp_path: Path) -> None:
    first = load_lora(write_trained_lora("sd1", "locon", tmp_path / "a.safetensors", seed=1))
    second = load_lora(write_trained_lora("sd1", "lora", tmp_path / "b.safetensors", seed=2))
    merged, report = merge_loras([(first, 0.7), (second, -0.4)], rule)
    for key, module in merged.modules.items():
        expected = sum(weight * source.modules[key].delta() for source, weight in ((first, 0.7), (second, -0.4))
                       if key in source.modules)
        torch.testing.assert_close(module.delta(), expected, rtol=1e-4, atol=1e-6, msg=key)
    if rule is None:
        key = next(k for k in merged.modules if k in first.modules and k in second.modules)
        assert merged.modules[key].rank == first.modules[key].rank + second.modules[key].rank
    else:
        assert report is not None and report.total_fraction == pytest.approx(1.0, abs=1e-6)


def test_written_file_round_trips_and_has_metadata(tmp_path: Path) -> None:
    source = load_lora(write_trained_lora("sdxl", "locon", tmp_path / "lora.safetensors"))
    path = save_lora(source, tmp_path / "out.safetensors", "sdxl", {"dreambooth_tool": "resize"})
    again = read_lora(lora_tensors(load_lora(path)))
    assert again.modules.keys() == source.modules.keys()
    metadata = load_lora(path).metadata
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_output_name"].startswith("out_") and metadata["sshs_model_hash"]
    assert metadata["dreambooth_tool"] == "resize"
