"""Extract a LoRA (LoCon for the 3x3 convolutions) from the difference between a trained model and its base.

Each layer's change is factored by SVD; the rank is fixed, or chosen per layer by a singular-value
ratio (keep singular values >= largest / ratio) or by retained energy (keep the smallest rank whose
squared singular values sum to the wanted fraction of the change's squared Frobenius norm). The
factors carry sqrt(S) on each side and alpha = rank, so the hosts apply them at scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ModelError
from ..train import lora as lora_training
from ..train import lora_keys
from .read import LoraFile, LoraModule
from .report import RetainedReport

RANK_MODES = ("fixed", "ratio", "energy")
# Energy targets are met up to float rounding: an exact rank-r change keeps 1 - 1e-12 at rank r.
ENERGY_SLACK = 1e-6


@dataclass(frozen=True)
class RankRule:
    """How many singular values a layer keeps: 'fixed' (value = rank), 'ratio' (value >= 1: keep
    s >= s_max / value) or 'energy' (0 < value <= 1: retained fraction); dynamic ranks stop at max_rank."""

    mode: str = "fixed"
    value: float = 8
    max_rank: int = 128

    def check(self, what: str = "rank") -> RankRule:
        if self.mode not in RANK_MODES:
            raise ModelError(f"Rank mode {self.mode!r} ({what}) is unknown; use one of {', '.join(RANK_MODES)}.")
        valid = {"fixed": self.value >= 1 and float(self.value).is_integer(), "ratio": self.value >= 1,
                 "energy": 0 < self.value <= 1}[self.mode]
        if not valid or self.max_rank < 1:
            hint = {"fixed": "a whole number >= 1", "ratio": "a ratio >= 1", "energy": "a fraction in (0, 1]"}
            raise ModelError(f"The {what} value {self.value} does not fit mode {self.mode!r}; use {hint[self.mode]}.")
        return self


def choose_rank(singular: torch.Tensor, rule: RankRule) -> int:
    """The rank `rule` keeps of singular values sorted in descending order (0 for an all-zero change)."""
    if singular.numel() == 0 or float(singular[0]) <= 0:
        return 0
    if rule.mode == "fixed":
        return min(int(rule.value), singular.numel())
    if rule.mode == "ratio":
        rank = int((singular >= singular[0] / rule.value).sum())
    else:
        energy = singular.double().pow(2)
        cumulative = energy.cumsum(0) / energy.sum()
        rank = int((cumulative < rule.value - ENERGY_SLACK).sum()) + 1
    return max(1, min(rank, rule.max_rank, singular.numel()))


def split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, shape: torch.Size,
                  scale: float = 1.0) -> LoraModule:
    """A LoraModule with up@down*scale = U[:, :rank] S[:rank] Vh[:rank], reshaped for the layer (conv: down
    keeps the kernel, up is 1x1), each side carrying sqrt(S / scale)."""
    root = (s[:rank] / scale).clamp(min=0).sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if len(shape) == 4:
        up, down = up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(rank) * scale)


def factor_change(delta: torch.Tensor, rule: RankRule) -> tuple[LoraModule, float, float]:
    """(module, kept energy, total energy) of one layer's weight change."""
    matrix = delta.float().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = choose_rank(s, rule)
    energy = s.double().pow(2)
    if rank == 0:  # unchanged layer of a changed part: a zero factor keeps fused attention groups whole
        zero = LoraModule(down=torch.zeros(1, *delta.shape[1:]), up=torch.zeros(delta.shape[0], 1,
                                                                                 *[1] * (delta.dim() - 2)), alpha=1.0)
        return zero, 0.0, 0.0
    return split_factors(u, s, vh, rank, delta.shape), float(energy[:rank].sum()), float(energy.sum())


# --- whole models -----------------------------------------------------------------------------------------

def target_layers(components: Any, with_conv: bool) -> dict[str, tuple[str, str]]:
    """Our key -> (part, module name) of every layer a LoRA of ours adapts (LoCon convs with `with_conv`)."""
    layers: dict[str, tuple[str, str]] = {}
    unet = components.denoiser
    ldm_names = lora_keys.unet_ldm_names(unet)
    for name in lora_training.unet_target_names(unet, with_conv):
        layers[lora_keys.unet_key(components.family, name, ldm_names[name])] = ("unet", name)
    for index, encoder in enumerate(components.text_encoders):
        part = lora_training.PART_NAMES[1 + index]
        for name in lora_training.text_encoder_target_names(encoder):
            layers[lora_keys.te_key(components.family, index, name)] = (part, name)
    return layers


def _weight(components: Any, part: str, name: str) -> torch.Tensor:
    return lora_training.model_parts(components)[part].get_submodule(name).weight.detach()


def layer_changes(trained: Any, base: Any, with_conv: bool) -> dict[str, torch.Tensor]:
    """Our key -> trained minus base weight, for every target layer of each part that changed at all."""
    if trained.family.rstrip("v") != base.family.rstrip("v"):
        raise ModelError(f"The trained model is {trained.family} and the base {base.family}: extract against the "
                         "base the model was trained from.")
    changes: dict[str, dict[str, torch.Tensor]] = {}
    for key, (part, name) in target_layers(trained, with_conv).items():
        new, old = _weight(trained, part, name), _weight(base, part, name)
        if new.shape != old.shape:
            raise ModelError(f"Layer {name} has shape {tuple(new.shape)} in the trained model and {tuple(old.shape)} "
                             "in the base: they are different architectures.")
        changes.setdefault(part, {})[key] = new.float() - old.float()
    return {key: delta for part in changes.values() if any(bool(d.any()) for d in part.values())
            for key, delta in part.items()}


def extract_lora(trained: Any, base: Any, rule: RankRule, conv_rule: RankRule | None = None
                 ) -> tuple[LoraFile, RetainedReport]:
    """LoRA (LoCon with `conv_rule`) of trained - base, and how much of the change each block keeps."""
    rule.check("rank")
    if conv_rule is not None:
        conv_rule.check("conv rank")
    report = RetainedReport()
    modules: dict[str, LoraModule] = {}
    with torch.no_grad():
        for key, delta in layer_changes(trained, base, conv_rule is not None).items():
            is_conv = delta.dim() == 4 and delta.shape[-1] > 1
            module, kept, total = factor_change(delta, conv_rule if is_conv and conv_rule else rule)
            modules[key] = module
            report.add(key, module.rank, kept, total)
    if not modules:
        raise ModelError("The trained model does not differ from the base in any layer a LoRA adapts; "
                         "choose the model that was trained and the checkpoint it was trained from.")
    return LoraFile(modules, {}, "extracted"), report
