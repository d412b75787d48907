"""Starting a LoRA from a file ('lora_init_file'): the new adapters act exactly as the file does at weight 1,
whatever the file's spelling and alpha; a rank that does not fit is one clear error."""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth.config.schema import TrainingConfig
from dreambooth.errors import ConfigError
from dreambooth.loratools.read import components_key_table
from dreambooth.models.tiny import tiny_components
from dreambooth.train import lora
from dreambooth.train.lora_init import apply_start_lora, read_start_lora

KINDS = {"lora": {"lora_rank": 4, "lora_alpha": 2.0},
         "locon": {"lora_rank": 3, "lora_alpha": 6.0, "lora_conv_rank": 2, "lora_conv_alpha": 1.0}}


@functools.cache
def _pristine(family: str) -> Any:
    return tiny_components(family, seed=0)


def fresh(family: str = "sd1") -> Any:
    pristine = _pristine(family)
    return dataclasses.replace(pristine, denoiser=copy.deepcopy(pristine.denoiser),
                               text_encoders=[copy.deepcopy(encoder) for encoder in pristine.text_encoders])


def config_for(kind: str, **overrides: Any) -> TrainingConfig:
    values = {"method": "lora", "save_precision": "fp32", "model_name": "tiny", "resolution": 64, **KINDS[kind]}
    return TrainingConfig(**{**values, **overrides})


def trained_file(kind: str, path: Path) -> tuple[Path, Any]:
    """Our export of adapters with random non-zero weights, and the components that carry them."""
    components = fresh()
    params = lora.add_lora(components, config_for(kind))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in (p for group in params.values() for p in group):
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    lora.export_lora(components, config_for(kind), path, {})
    return path, components


def started(config: TrainingConfig, lora_dir: Path) -> tuple[Any, list[str]]:
    """Fresh components with adapters that start from config.lora_init_file, and the warnings given."""
    components, warnings = fresh(), []
    start = read_start_lora(config, components, lora_dir, warnings.append)
    lora.add_lora(components, config)
    apply_start_lora(components, start, warnings.append)
    return components, warnings


def merged_weights(components: Any) -> dict[str, torch.Tensor]:
    lora.merge_lora(components)
    return {f"{part}.{key}": value for part, model in lora.model_parts(components).items()
            for key, value in model.state_dict().items()}


def assert_same_effect(first: Any, second: Any) -> None:
    a, b = merged_weights(first), merged_weights(second)
    assert a.keys() == b.keys()
    changed = [key for key in a if not torch.equal(a[key], base_weights()[key])]
    assert changed, "the trained LoRA changed nothing: the comparison would prove nothing"
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)


@functools.cache
def base_weights() -> dict[str, torch.Tensor]:
    return {f"{part}.{key}": value for part, model in lora.model_parts(fresh()).items()
            for key, value in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_start_acts_as_the_file_with_another_alpha(kind: str, tmp_path: Path) -> None:
    path, trained = trained_file(kind, tmp_path / "ours.safetensors")
    # Other alphas than the file's: the conversion must keep the effect at weight 1.
    config = config_for(kind, lora_init_file=path.name, lora_alpha=16.0, lora_conv_alpha=5.0)
    components, warnings = started(config, tmp_path)
    assert not warnings
    assert_same_effect(components, trained)


def peft_spelling(path: Path, out: Path) -> Path:
    """Our file as diffusers/peft writes it: '<part>.<module>.lora_A/B.weight', no alpha (scale folded into B)."""
    tensors, table = load_file(str(path)), components_key_table(fresh())
    respelled = {}
    for key in {key.split(".", 1)[0] for key in tensors}:
        target = table.targets[key]
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        scale = float(tensors[f"{key}.alpha"]) / down.shape[0]
        respelled[f"{target.part}.{target.module}.lora_A.weight"] = down
        respelled[f"{target.part}.{target.module}.lora_B.weight"] = up * scale
    save_file(respelled, str(out))
    return out


def test_peft_spelled_file_starts_the_same(tmp_path: Path) -> None:
    path, trained = trained_file("lora", tmp_path / "ours.safetensors")
    (tmp_path / "elsewhere").mkdir()
    theirs = peft_spelling(path, tmp_path / "elsewhere" / "theirs.safetensors")  # a path outside the LoRA folder
    components, warnings = started(config_for("lora", lora_init_file=str(theirs)), tmp_path)
    assert not warnings
    assert_same_effect(components, trained)


def test_rank_mismatch_is_one_clear_error(tmp_path: Path) -> None:
    path, _ = trained_file("lora", tmp_path / "ours.safetensors")
    with pytest.raises(ConfigError, match=r"ours\.safetensors: layer lora_\w+ has rank 4 but setting 'lora_rank' is 2"):
        started(config_for("lora", lora_init_file=path.stem, lora_rank=2), tmp_path)


def test_conv_layers_without_locon_and_untrained_parts_are_counted(tmp_path: Path) -> None:
    path, _ = trained_file("locon", tmp_path / "ours.safetensors")
    config = config_for("lora", lora_rank=3, lora_init_file=path.name, train_text_encoder=False)
    _, warnings = started(config, tmp_path)
    assert len(warnings) == 1
    assert "belong to a part this run does not train" in warnings[0] and "lora_te_" in warnings[0]
    assert "layers this LoRA does not adapt" in warnings[0] and "lora_conv_rank" in warnings[0]


def test_missing_file_and_dora_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'lora_init_file': 'nothing' is neither a file in the LoRA folder"):
        started(config_for("lora", lora_init_file="nothing"), tmp_path)
    with pytest.raises(ConfigError, match="'use_dora'"):
        started(config_for("lora", lora_init_file="nothing", use_dora=True), tmp_path)


def test_session_starts_from_a_file_in_the_lora_folder(env: Any) -> None:
    """Through build_session: the run's adapters, right after the build, act as the file does in the host."""
    from dreambooth.models.components import load_components
    from dreambooth.train.events import TrainCallbacks
    from dreambooth.train.session import build_session

    path, _ = trained_file("lora", env.layout.lora_dir / "start.safetensors")
    config = env.configured(method="lora", lora_rank=4, lora_alpha=1.0, lora_init_file="start")
    session = build_session(config, env.model, env.host, TrainCallbacks(), resume=False)
    reference = load_components(env.model.working, torch.float32)
    assert lora.apply_host_lora(reference, path) == []
    ours = merged_weights(session.components)
    for key, value in merged_weights(reference).items():
        torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=1e-5, msg=key)
