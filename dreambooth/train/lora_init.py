"""Start a new LoRA from a LoRA file (setting 'lora_init_file') instead of peft's random start.

The file is read with the LoRA tools' reader, so every spelling it understands works (kohya/A1111,
diffusers/peft, OneTrainer, ComfyUI). Its keys are resolved against the model's own key table, built
before peft wraps the layers (the same names the exporter writes); each layer's pair is then copied into
the peft adapter at that module. The hosts apply (alpha/rank)·up·down, peft applies scaling·B·A with
scaling = lora_alpha/r from the settings, so B gets up·(file scale / peft scaling): at weight 1 the new
LoRA starts exactly where the file is, whatever alpha either side uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config.schema import TrainingConfig
from ..errors import ConfigError, ModelError
from .lora import ADAPTER, model_parts

if TYPE_CHECKING:
    from ..loratools.read import LoraFile, LoraModule, Target

SETTING = "lora_init_file"


@dataclass
class StartLora:
    """A file read for the start of a run: its modules and, for each of its keys, the layer it names."""

    path: Path
    lora: LoraFile
    targets: dict[str, Target]


def init_file_path(name: str, lora_dir: Path) -> Path:
    """The file a 'lora_init_file' value names: a file in the LoRA folder (with or without its
    .safetensors suffix), else a path."""
    given = Path(name.strip()).expanduser()
    candidates = [lora_dir / given, lora_dir / f"{given}.safetensors", given] if not given.is_absolute() else [given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"Setting '{SETTING}': {name!r} is neither a file in the LoRA folder {lora_dir} nor an "
                      "existing path; give a .safetensors LoRA file, or leave it empty for a fresh start.")


def read_start_lora(config: TrainingConfig, components: Any, lora_dir: Path,
                    warn: Callable[[str], None]) -> StartLora | None:
    """Read the start file of a LoRA run (None when there is none); call before add_lora wraps the layers."""
    if not config.lora_init_file.strip():
        return None
    if config.method != "lora":
        warn(f"Setting '{SETTING}' is ignored: it only acts when 'method' is lora.")
        return None
    if config.use_dora:
        raise ConfigError(f"Setting '{SETTING}' cannot be used with 'use_dora': a DoRA start needs magnitudes a "
                          "LoRA file does not hold; turn DoRA off or leave the start file empty.")
    # The LoRA tools import train (key names); train reads through them only here, at run time.
    from ..loratools.read import components_key_table, load_lora

    path = init_file_path(config.lora_init_file, lora_dir)
    table = components_key_table(components)
    lora = load_lora(path, table=table, family=components.family)
    return StartLora(path, lora, {key: table.targets[key] for key in lora.modules})


def apply_start_lora(components: Any, start: StartLora, warn: Callable[[str], None]) -> None:
    """Copy the file's pairs into the adapters add_lora created; warns about the layers it had to leave out."""
    parts = model_parts(components)
    untrained: list[str] = []
    unadapted: list[str] = []
    for key, module in start.lora.modules.items():
        target = start.targets[key]
        layer = parts[target.part].get_submodule(target.module)
        adapters = getattr(layer, "lora_A", None)
        if adapters is None or ADAPTER not in adapters:
            (unadapted if _part_has_adapters(parts[target.part]) else untrained).append(key)
            continue
        _copy_pair(start.path, key, module, layer)
    _report_skipped(start, untrained, unadapted, warn)


def _part_has_adapters(model: torch.nn.Module) -> bool:
    return any("lora_A" in name for name, _ in model.named_modules())


def _copy_pair(path: Path, key: str, module: LoraModule, layer: Any) -> None:
    if module.diff is not None or module.dora_scale is not None:
        raise ModelError(f"{path.name}: layer {key} is a {'full-difference' if module.diff is not None else 'DoRA'} "
                         f"module, which a LoRA cannot start from; use a plain LoRA/LoCon file for '{SETTING}'.")
    rank, scaling = layer.r[ADAPTER], layer.scaling[ADAPTER]
    setting = "lora_conv_rank" if _is_spatial_conv(layer) else "lora_rank"
    if module.rank != rank:
        raise ConfigError(f"{path.name}: layer {key} has rank {module.rank} but setting '{setting}' is {rank}; set "
                          f"'{setting}' to {module.rank} to start from this file.")
    if scaling == 0:
        raise ConfigError(f"Setting '{setting.replace('rank', 'alpha')}' is 0, so the LoRA has no effect and cannot "
                          f"take the weights of {path.name}; set it above 0.")
    down_weight, up_weight = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    for name, value, weight in (("lora_down", module.down, down_weight), ("lora_up", module.up, up_weight)):
        if value.numel() != weight.numel():
            raise ModelError(f"{path.name}: layer {key} has a {name} of shape {tuple(value.shape)}, the model's "
                             f"layer needs {tuple(weight.shape)}; the LoRA was made for another model.")
    with torch.no_grad():
        down_weight.copy_(module.down.reshape(down_weight.shape))
        up_weight.copy_((module.up.float() * (module.scale / scaling)).reshape(up_weight.shape))


def _is_spatial_conv(layer: Any) -> bool:
    base = layer.get_base_layer()
    return isinstance(base, torch.nn.Conv2d) and tuple(base.kernel_size) != (1, 1)


def _report_skipped(start: StartLora, untrained: list[str], unadapted: list[str], warn: Callable[[str], None]) -> None:
    total = len(start.lora.modules)
    if len(untrained) + len(unadapted) == total:
        raise ConfigError(f"None of the {total} layers of {start.path.name} ('{SETTING}') is trained by this run; "
                          "turn on the parts it changes ('train_unet', 'train_text_encoder', 'lora_conv_rank').")
    reasons = []
    if untrained:
        reasons.append(f"{len(untrained)} belong to a part this run does not train (e.g. {untrained[0]}; see "
                       "'train_unet' and 'train_text_encoder')")
    if unadapted:
        reasons.append(f"{len(unadapted)} are layers this LoRA does not adapt (e.g. {unadapted[0]}; 3x3 "
                       "convolutions need 'lora_conv_rank' above 0)")
    if reasons:
        warn(f"Setting '{SETTING}': {len(untrained) + len(unadapted)} of the {total} layers of {start.path.name} "
             f"were left out: {'; '.join(reasons)}; the run does not start from them.")
