"""Resize a LoRA to a lower rank (fixed, or per layer by singular-value ratio or retained energy).

A layer's change scale * up @ down is re-factored exactly through QR of both factors and the SVD of the
small rank x rank core, so no full-size weight is formed; full-difference layers are factored directly.
The new alpha keeps each layer's alpha/rank scale (alpha_new = alpha_old * rank_new / rank_old), so the
effect at weight 1 stays the same and the full rank reproduces the LoRA exactly. DoRA magnitudes
(dora_scale) are kept unchanged.
"""

from __future__ import annotations

import torch

from ..errors import ModelError
from .extract import RankRule, choose_rank, split_factors
from .read import LoraFile, LoraModule
from .report import RetainedReport


def product_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of up @ down (up: out x r, down: r x in) from QR factors: exact, costs O((out + in) r^2)."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return (q_up @ u).float(), s.float(), (vh @ q_down.T).float()


def _layer_svd(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Size, float]:
    if module.diff is not None:
        delta = module.diff.float()
        u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
        return u, s, vh, delta.shape, 1.0
    up, down = module.up.float(), module.down.float()
    u, s, vh = product_svd(up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1))
    shape = torch.Size([up.shape[0], *down.shape[1:]])
    # alpha 0 switches a layer off; it stays off (zero factors) at scale 1.
    return u, s * module.scale, vh, shape, module.scale if module.scale != 0 else 1.0


def resize_module(module: LoraModule, rule: RankRule) -> tuple[LoraModule, float, float]:
    """(resized module, kept energy, total energy); the module's alpha/rank scale is kept."""
    u, s, vh, shape, scale = _layer_svd(module)
    rank = max(1, choose_rank(s, rule))
    energy = s.double().pow(2)
    resized = split_factors(u, s, vh, min(rank, s.numel()), shape, scale)
    resized.dora_scale = module.dora_scale
    return resized, float(energy[:resized.rank].sum()), float(energy.sum())


def resize_lora(lora: LoraFile, rule: RankRule) -> tuple[LoraFile, RetainedReport]:
    """Every layer re-factored to the rule's rank; the report says how much of each block's change stays."""
    rule.check("rank")
    if not lora.modules:
        raise ModelError(f"{lora.name} holds no LoRA layers to resize.")
    report = RetainedReport()
    modules: dict[str, LoraModule] = {}
    with torch.no_grad():
        for key, module in lora.modules.items():
            modules[key], kept, total = resize_module(module, rule)
            report.add(key, modules[key].rank, kept, total)
    return LoraFile(modules, dict(lora.metadata), lora.name), report
