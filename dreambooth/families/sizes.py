"""What a family's real models weigh, counted on meta tensors, and which of their layers a LoRA adapts.

The memory estimate, the presets and the pre-flight read sizes from here instead of tables of numbers: a
family's components are built from the full-size configs it ships (`resources/configs/<folder>/`) on the
meta device, which allocates nothing, and their parameters are counted. The LoRA target rules live here
too, so the trainer (train/lora.py) and the estimate adapt the same layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .tables import HF_LAYER_PREFIX, hf_text_name

if TYPE_CHECKING:
    import torch

    from .base import ModelFamily

TE_TARGET_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "mlp.fc1", "mlp.fc2")
# Counts per family name: building SDXL's UNet on meta tensors takes a second, the guide asks often.
_COUNTS: dict[str, dict[str, int]] = {}
_LORA_COUNTS: dict[str, dict[str, int]] = {}


# --- LoRA targets --------------------------------------------------------------------------------------

def _is_conv(module: Any, kernel: tuple[int, int]) -> bool:
    import torch

    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == kernel


def unet_lora_targets(unet: Any, with_conv: bool) -> list[str]:
    """Linear and 1x1 conv layers of the UNet's attention blocks; with LoCon also the 3x3 convs of the
    resnets and samplers (conv_in/conv_out stay frozen, as in kohya's LoCon)."""
    import torch

    names = []
    for name, module in unet.named_modules():
        in_attention = ".attentions." in name
        is_linear_like = isinstance(module, torch.nn.Linear) or _is_conv(module, (1, 1))
        is_locon_conv = _is_conv(module, (3, 3)) and (".resnets." in name or "samplers." in name)
        if (in_attention and is_linear_like) or (with_conv and is_locon_conv):
            names.append(name)
    return names


def text_lora_targets(encoder: Any) -> list[str]:
    """The attention projections and MLP layers of every transformer layer of a CLIP text encoder."""
    import torch

    return [name for name, module in encoder.named_modules()
            if isinstance(module, torch.nn.Linear)
            and hf_text_name(name).startswith(HF_LAYER_PREFIX)
            and name.endswith(TE_TARGET_SUFFIXES)]


def adapted_width(module: Any) -> int:
    """LoRA parameters per unit of rank on one layer: its input plus output width (down and up matrices)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return int(module.in_features + module.out_features)
    return int(module.in_channels + module.out_channels)


# --- empty models and their sizes ----------------------------------------------------------------------

def empty_models(family: ModelFamily) -> dict[str, torch.nn.Module]:
    """Every component of the family's real model, on the meta device (no memory, no weights)."""
    import torch

    configs = family.shipped_configs()
    with torch.device("meta"):
        return {part: family.build_component(part, configs[part]) for part in family.component_folders()}


def parameter_counts(family: ModelFamily) -> dict[str, int]:
    """Parameters of each component of the real model (component folder -> count)."""
    if family.name not in _COUNTS:
        models = empty_models(family)
        _COUNTS[family.name] = {part: sum(p.numel() for p in model.parameters()) for part, model in models.items()}
        _LORA_COUNTS[family.name] = _lora_widths(family, models)
    return dict(_COUNTS[family.name])


def _lora_widths(family: ModelFamily, models: Mapping[str, Any]) -> dict[str, int]:
    trainable = (family.denoiser_folder, *(encoder.folder for encoder in family.text_encoders))
    widths = {}
    for part in trainable:
        modules = dict(models[part].named_modules())
        names = family.lora_target_names(part, models[part], with_conv=False)
        widths[part] = sum(adapted_width(modules[name]) for name in names)
    return widths


def lora_parameters_per_rank(family: ModelFamily) -> dict[str, int]:
    """LoRA parameters per unit of rank of each trainable component (denoiser and text encoders)."""
    parameter_counts(family)
    return dict(_LORA_COUNTS[family.name])
