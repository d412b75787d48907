"""The SD3 transformer's single-file (MMDiT) layout, derived from diffusers' own single-file converter.

`diffusers.loaders.single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers` reads an original file:
it renames keys, splits the fused q/k/v projections into thirds and swaps the scale/shift halves of two
modulation layers. Running it once on probe tensors whose values count their own key and row tells, for
every diffusers weight, which original key and which rows of it the weight holds. Inverting that gives the
export, so no name table is copied by hand and a change of diffusers' converter is followed automatically.

A probe is 1-D with PROBE_ROWS rows (divisible by 2 and 3, the only splits the converter makes); a row range
of a probe stands for the same fraction of the real tensor's first dimension.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PROBE_ROWS = 6
ORIGINAL_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) (in probe rows) of an original key, held by rows [first, first + stop - start) of
    the diffusers weight `diffusers_key`, whose probe had `rows` rows."""

    diffusers_key: str
    start: int
    stop: int
    first: int
    rows: int


class _ProbeCheckpoint(dict):  # type: ignore[type-arg]
    """An original checkpoint that invents a probe tensor for every key the converter asks for."""

    def __init__(self, seeds: list[str]):
        super().__init__()
        self.order: list[str] = []
        for key in seeds:
            self[key] = self._probe(key)

    def _probe(self, key: str) -> Any:
        import torch

        if key not in self.order:
            self.order.append(key)
        index = self.order.index(key)
        return torch.arange(PROBE_ROWS, dtype=torch.float64) + index * PROBE_ROWS

    def __missing__(self, key: str) -> Any:
        self[key] = self._probe(key)
        return self[key]

    def pop(self, key: str, *default: Any) -> Any:  # noqa: D102 - dict.pop that invents missing keys
        if key not in self:
            self[key] = self._probe(key)
        return super().pop(key, *default)


def _seed_keys(layers: int, dual_layers: tuple[int, ...], qk_norm: bool) -> list[str]:
    """The keys the converter inspects to learn the architecture (block count, dual attention, q/k norm)."""
    seeds = [f"joint_blocks.{i}.x_block.attn.qkv.weight" for i in range(layers)]
    seeds += [f"joint_blocks.{i}.x_block.attn2.qkv.weight" for i in dual_layers]
    seeds += ["context_embedder.weight"] + (["joint_blocks.0.x_block.attn.ln_q.weight"] if qk_norm else [])
    return seeds


def _runs(values: list[int]) -> list[tuple[int, int, int]]:
    """(original key index, first probe row, length) of each run of consecutive rows of one original key."""
    runs: list[tuple[int, int, int]] = []
    for value in values:
        key, row = divmod(value, PROBE_ROWS)
        if runs and runs[-1][0] == key and runs[-1][1] + runs[-1][2] == row:
            runs[-1] = (key, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((key, row, 1))
    return runs


@functools.cache
def original_pieces(layers: int, dual_layers: tuple[int, ...], qk_norm: bool) -> dict[str, tuple[Piece, ...]]:
    """Original key (without `model.diffusion_model.`) -> the diffusers pieces it is made of, in row order."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    probe = _ProbeCheckpoint(_seed_keys(layers, dual_layers, qk_norm))
    converted = convert_sd3_transformer_checkpoint_to_diffusers(probe)
    pieces: dict[str, list[Piece]] = {}
    for diffusers_key, tensor in converted.items():
        values = [int(v) for v in tensor.reshape(-1).tolist()]
        first = 0
        for key_index, start, length in _runs(values):
            piece = Piece(diffusers_key, start, start + length, first, len(values))
            pieces.setdefault(probe.order[key_index], []).append(piece)
            first += length
    return {key: tuple(sorted(found, key=lambda piece: piece.start)) for key, found in pieces.items()}


def architecture(config: Mapping[str, Any]) -> tuple[int, tuple[int, ...], bool]:
    """(blocks, dual-attention blocks, q/k norm) of an SD3Transformer2DModel config."""
    return (int(config["num_layers"]), tuple(int(i) for i in config.get("dual_attention_layers") or ()),
            config.get("qk_norm") is not None)


def _rows(tensor: Any, piece: Piece) -> Any:
    if piece.first == 0 and piece.stop - piece.start == piece.rows:
        return tensor  # the whole weight (shapes such as pos_embed's (1, N, C) have no rows to split)
    size = tensor.shape[0]
    begin, end = piece.first * size, (piece.first + piece.stop - piece.start) * size
    if begin % piece.rows or end % piece.rows:
        raise ValueError(f"weight {piece.diffusers_key} has {size} rows, which do not split as its probe did")
    return tensor[begin // piece.rows:end // piece.rows]


def to_original(state_dict: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer's weights under their single-file keys; a weight the layout does not place is an error."""
    import torch

    table = original_pieces(*architecture(config))
    placed = {piece.diffusers_key for pieces in table.values() for piece in pieces}
    unplaced = sorted(set(state_dict) - placed)
    if unplaced:
        raise ValueError(f"transformer weight {unplaced[0]!r} has no place in the original layout (unsupported "
                         "architecture)")
    converted = {}
    for key, pieces in table.items():
        parts = [_rows(state_dict[piece.diffusers_key], piece) for piece in pieces]
        converted[ORIGINAL_PREFIX + key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return converted


def fused_modules(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """Original module -> the diffusers modules whose whole weights it stacks, in row order (one for a renamed
    module, q/k/v for a fused projection); modules whose rows the converter reorders are left out."""
    table = original_pieces(*architecture(config))
    stacked: dict[str, list[str]] = {}
    for key, pieces in table.items():
        whole = all(piece.first == 0 and piece.stop - piece.start == piece.rows for piece in pieces)
        if key.endswith(".weight") and whole:
            stacked[key.rpartition(".")[0]] = [piece.diffusers_key.rpartition(".")[0] for piece in pieces]
    return stacked


def original_lora(factors: Mapping[str, tuple[Any, Any]], denoiser: Any) -> dict[str, Any]:
    """kohya-style tensors (`lora_unet_<original module>`) of adapted diffusers modules. A fused q/k/v gets one
    LoRA of the summed rank: the downs stacked, the ups block-diagonal (zero where a part is not adapted), so
    up @ down is exactly each part's change in its rows of the fused weight."""
    import torch

    tensors = {}
    for original, parts in fused_modules(denoiser.config).items():
        adapted = [part for part in parts if part in factors]
        if not adapted:
            continue
        rows = [denoiser.get_submodule(part).out_features for part in parts]
        down = torch.cat([factors[part][0] for part in adapted], dim=0)
        up = torch.zeros(sum(rows), down.shape[0])
        row = rank = 0
        for part, height in zip(parts, rows, strict=True):
            if part in factors:
                width = factors[part][0].shape[0]
                up[row:row + height, rank:rank + width] = factors[part][1]
                rank += width
            row += height
        key = "lora_unet_" + original.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
    unplaced = sorted(set(factors) - {part for parts in fused_modules(denoiser.config).values() for part in parts})
    if unplaced:
        raise ValueError(f"LoRA layer {unplaced[0]} has no whole place in the original layout")
    return tensors
