"""Where each weight of diffusers' FluxTransformer2DModel lives in the original (Black Forest Labs) layout.

The original layout is the one Forge, ComfyUI and the released `flux1-dev.safetensors` use: `double_blocks.N`
fuse the image and the text stream's q, k and v into one `qkv` linear each, `single_blocks.N.linear1` fuses
q, k, v and the MLP input. diffusers splits those into separate layers. A `Slot` says which rows of which
original weight a diffusers weight is; the final AdaLN modulation keeps its two halves in the other order.

One table serves reading original files (for widths diffusers' converter does not handle, such as the tiny
test models), writing them, and the LoRA key writer (a LoRA on a split layer lands in its rows of the fused
original weight). Nothing here imports torch at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .tables import Slot

if TYPE_CHECKING:
    import torch

# Keys only a Flux transformer has (original or diffusers layout), and those only dev's guidance embedding has.
FLUX_MARKERS = ("double_blocks.0.img_attn.norm.key_norm.scale", "single_transformer_blocks.0.proj_mlp.weight")
GUIDANCE_MARKERS = ("guidance_in.in_layer.weight", "guidance_embedder.linear_1.weight")
MLP_RATIO = 4  # Flux.1's MLP width over its hidden width (diffusers' FluxSingleTransformerBlock default)
# The width every released Flux.1 model has; diffusers' single-file converter assumes it.
RELEASED_INNER_DIM = 3072


def inner_dim(config: Mapping[str, Any]) -> int:
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])


# diffusers module -> original module, inside one double block / one single block / at the top.
DOUBLE_RENAMES = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                  "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                  "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                  "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE_RENAMES = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
SINGLE_FUSED_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
TOP_RENAMES = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
               "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
               "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
               "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
               "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
FINAL_MODULATION = ("norm_out.linear", "final_layer.adaLN_modulation.1")
GUIDANCE_PREFIX = "time_text_embed.guidance_embedder."


def _linear_slots(diffusers: str, original: str, start: int = 0, rows: int | None = None,
                  swap: bool = False) -> dict[str, Slot]:
    return {f"{diffusers}.{leaf}": Slot(f"{original}.{leaf}", start, rows, swap) for leaf in ("weight", "bias")}


def _norm_slots(diffusers: str, original: str) -> dict[str, Slot]:
    return {f"{diffusers}.weight": Slot(f"{original}.scale")}


def _fused_slots(block: str, parts: tuple[str, ...], original: str, sizes: tuple[int, ...]) -> dict[str, Slot]:
    slots: dict[str, Slot] = {}
    start = 0
    for part, size in zip(parts, sizes, strict=True):
        slots.update(_linear_slots(f"{block}.{part}", original, start, size))
        start += size
    return slots


def _double_block(index: int, width: int) -> dict[str, Slot]:
    block, original = f"transformer_blocks.{index}", f"double_blocks.{index}"
    slots: dict[str, Slot] = {}
    for name, renamed in DOUBLE_RENAMES.items():
        slots.update(_linear_slots(f"{block}.{name}", f"{original}.{renamed}"))
    for name, renamed in DOUBLE_NORMS.items():
        slots.update(_norm_slots(f"{block}.{name}", f"{original}.{renamed}"))
    for fused, parts in DOUBLE_FUSED.items():
        slots.update(_fused_slots(block, parts, f"{original}.{fused}", (width,) * 3))
    return slots


def _single_block(index: int, width: int) -> dict[str, Slot]:
    block, original = f"single_transformer_blocks.{index}", f"single_blocks.{index}"
    slots: dict[str, Slot] = {}
    for name, renamed in SINGLE_RENAMES.items():
        slots.update(_linear_slots(f"{block}.{name}", f"{original}.{renamed}"))
    for name, renamed in SINGLE_NORMS.items():
        slots.update(_norm_slots(f"{block}.{name}", f"{original}.{renamed}"))
    sizes = (width, width, width, width * MLP_RATIO)
    slots.update(_fused_slots(block, SINGLE_FUSED_PARTS, f"{original}.linear1", sizes))
    return slots


def key_table(config: Mapping[str, Any]) -> dict[str, Slot]:
    """Every weight key of a FluxTransformer2DModel built from `config` -> its slot in the original layout."""
    width = inner_dim(config)
    slots: dict[str, Slot] = {}
    for name, renamed in TOP_RENAMES.items():
        if config.get("guidance_embeds") or not name.startswith(GUIDANCE_PREFIX):
            slots.update(_linear_slots(name, renamed))
    slots.update(_linear_slots(*FINAL_MODULATION, swap=True))
    for index in range(int(config["num_layers"])):
        slots.update(_double_block(index, width))
    for index in range(int(config["num_single_layers"])):
        slots.update(_single_block(index, width))
    return slots


def module_table(config: Mapping[str, Any]) -> dict[str, Slot]:
    """diffusers linear module -> its original module and rows (the `.weight` entries, without the leaf)."""
    return {key.removesuffix(".weight"): Slot(slot.original.removesuffix(".weight"), slot.start, slot.rows,
                                              slot.swap_halves)
            for key, slot in key_table(config).items() if key.endswith(".weight") and slot.original.endswith(".weight")}


# --- LoRA ------------------------------------------------------------------------------------------------

LORA_PREFIX = "lora_unet_"  # kohya's Flux key prefix; Forge and ComfyUI match it against the original names
LORA_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def lora_target_names(transformer: Any) -> list[str]:
    """Every linear layer of the double and single blocks: attention, MLP and modulation (what kohya's Flux
    LoRA trains by default); the embedders and the final layer stay frozen."""
    import torch

    return [name for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith(LORA_BLOCKS)]


def lora_key(original: str) -> str:
    """The host's LoRA key of an original-layout layer: `lora_unet_` + its path with '_'."""
    return LORA_PREFIX + original.replace(".", "_")


# --- applying the table ----------------------------------------------------------------------------------

def _swapped(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers Flux transformer state dict in the original layout (fused layers concatenated in order)."""
    import torch

    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, slot in key_table(config).items():
        if key not in state_dict:
            raise ValueError(f"Flux transformer weight {key!r} is missing")
        value = _swapped(state_dict[key]) if slot.swap_halves else state_dict[key]
        parts.setdefault(slot.original, []).append((slot.start, value))
    unknown = sorted(set(state_dict) - set(key_table(config)))
    if unknown:
        raise ValueError(f"Flux transformer weight {unknown[0]!r} has no place in the original layout")
    return {original: pieces[0][1] if len(pieces) == 1 else torch.cat([v for _, v in sorted(pieces, key=_start)])
            for original, pieces in parts.items()}


def _start(piece: tuple[int, Any]) -> int:
    return piece[0]


def from_original(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The diffusers weights of an original-layout transformer state dict (keys without a model prefix)."""
    converted = {}
    for key, slot in key_table(config).items():
        if slot.original not in state_dict:
            raise ValueError(f"Flux transformer weight {slot.original!r} is missing")
        value = state_dict[slot.original]
        if slot.rows is not None:
            value = value.narrow(0, slot.start, slot.rows)
        converted[key] = _swapped(value) if slot.swap_halves else value
    return converted


# The weights that tell a transformer's shape, in each layout: (width and input, text width, pooled width,
# head width, guidance embedding, double block prefix, single block prefix).
SHAPE_KEYS = {
    "original": ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight",
                 "double_blocks.0.img_attn.norm.query_norm.scale", "guidance_in.in_layer.weight",
                 "double_blocks.", "single_blocks."),
    "diffusers": ("x_embedder.weight", "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight",
                  "transformer_blocks.0.attn.norm_q.weight", "time_text_embed.guidance_embedder.linear_1.weight",
                  "transformer_blocks.", "single_transformer_blocks."),
}


def config_from_weights(weights: Mapping[str, Any], base: Mapping[str, Any], layout: str) -> dict[str, Any]:
    """The transformer config of a state dict in `layout` ('original' or 'diffusers'): `base` (the released
    config) with the block counts, widths and guidance embedding the weights have (anything with `.shape`)."""
    image, text, pooled, head, guidance, doubles, singles = SHAPE_KEYS[layout]
    width, head_dim = int(weights[image].shape[0]), int(weights[head].shape[0])
    return {**base, "num_layers": _count(weights, doubles), "num_single_layers": _count(weights, singles),
            "attention_head_dim": head_dim, "num_attention_heads": width // head_dim,
            "in_channels": int(weights[image].shape[1]), "joint_attention_dim": int(weights[text].shape[1]),
            "pooled_projection_dim": int(weights[pooled].shape[1]), "guidance_embeds": guidance in weights}


def _count(weights: Mapping[str, Any], prefix: str) -> int:
    return len({key[len(prefix):].split(".", 1)[0] for key in weights if key.startswith(prefix)})
