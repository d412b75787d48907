"""LoRA tensors for hosts whose model fuses layers that diffusers keeps apart (Flux's q, k, v and MLP input).

We train one adapter per diffusers layer (to_q, to_k, to_v, ...); the host (Forge, ComfyUI; kohya's file format)
names one fused layer (`double_blocks.0.img_attn.qkv`) and applies `alpha / rank * up @ down` to all its rows.
Several adapters on one fused layer are written as one LoRA of their summed rank whose `down` stacks theirs and
whose `up` is block-diagonal: each adapter's up in its own rows and rank columns, zeros elsewhere. That is exact:
up @ down reproduces each adapter's change in its rows and leaves the rows of untrained layers alone. Each
block is scaled so that one alpha for the fused layer gives every adapter its own trained strength.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..families.tables import Slot


@dataclass
class Factors:
    """One trained adapter: its change is `scale * up @ down`, or `diff` itself (DoRA, exported exactly)."""

    down: torch.Tensor | None
    up: torch.Tensor | None
    scale: float
    diff: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        if self.diff is not None:
            return self.diff
        assert self.up is not None and self.down is not None
        return self.scale * (self.up.reshape(self.up.shape[0], -1) @ self.down.reshape(self.rank, -1))


def swap_halves(rows: torch.Tensor) -> torch.Tensor:
    first, second = rows.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def fused_rows(slots: Mapping[str, Slot], original: str) -> int:
    """Output rows of the host's fused layer `original`: the end of its last slot."""
    return max(slot.start + (slot.rows or 0) for slot in slots.values() if slot.original == original)


def layer_factors(module: Any, adapter: str) -> Factors:
    """The factors of one peft LoRA layer; DoRA as its exact weight change (peft merges it on a copy)."""
    if module.use_dora.get(adapter, False):
        merged = copy.deepcopy(module)
        merged.merge(adapter_names=[adapter])
        diff = (merged.get_base_layer().weight - module.get_base_layer().weight).detach().float()
        return Factors(None, None, 1.0, diff)
    return Factors(module.lora_A[adapter].weight.detach().float(), module.lora_B[adapter].weight.detach().float(),
                   float(module.scaling[adapter]))


def _plain(key: str, factors: Factors, slot: Slot) -> dict[str, torch.Tensor]:
    if factors.diff is not None:
        diff = swap_halves(factors.diff) if slot.swap_halves else factors.diff
        return {f"{key}.diff": diff}
    assert factors.up is not None and factors.down is not None
    up = swap_halves(factors.up) if slot.swap_halves else factors.up
    return {f"{key}.lora_down.weight": factors.down, f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(factors.scale * factors.rank, dtype=torch.float32)}


def _fused_diff(key: str, members: list[tuple[Slot, Factors]], rows: int) -> dict[str, torch.Tensor]:
    """Any DoRA member makes the fused layer a full difference (untouched rows zero)."""
    first = members[0][1].delta()
    diff = torch.zeros((rows, *first.shape[1:]), dtype=torch.float32)
    for slot, factors in members:
        diff[slot.start:slot.start + factors.delta().shape[0]] = factors.delta().reshape(-1, *first.shape[1:])
    return {f"{key}.diff": diff}


def _fused(key: str, members: list[tuple[Slot, Factors]], rows: int) -> dict[str, torch.Tensor]:
    if any(factors.diff is not None for _, factors in members):
        return _fused_diff(key, members, rows)
    total_rank = sum(factors.rank for _, factors in members)
    scale = members[0][1].scale
    downs, up, column = [], torch.zeros((rows, total_rank), dtype=torch.float32), 0
    for slot, factors in members:
        assert factors.up is not None and factors.down is not None
        downs.append(factors.down)
        block = factors.up.float() * (factors.scale / scale) if scale else factors.up.float()
        up[slot.start:slot.start + block.shape[0], column:column + factors.rank] = block
        column += factors.rank
    return {f"{key}.lora_down.weight": torch.cat(downs, dim=0), f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(scale * total_rank, dtype=torch.float32)}


def host_tensors(layers: Mapping[str, Factors], slots: Mapping[str, Slot],
                 key_of: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """The host file's tensors for trained `layers` (diffusers layer name -> factors), placed by `slots` (every
    layer of the model -> its slot; `key_of` turns a slot's original name into the host's LoRA key)."""
    groups: dict[str, list[tuple[Slot, Factors]]] = {}
    for name, factors in layers.items():
        slot = slots[name]
        groups.setdefault(slot.original, []).append((slot, factors))
    tensors: dict[str, torch.Tensor] = {}
    for original, members in groups.items():
        key = key_of(original)
        slot, factors = members[0]
        if len(members) == 1 and slot.rows is None:
            tensors.update(_plain(key, factors, slot))
            continue
        members.sort(key=lambda member: member[0].start)
        rows = fused_rows(slots, original)
        tensors.update(_fused(key, members, rows))
    return tensors
