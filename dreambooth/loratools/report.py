"""How much of each layer's change a low-rank factorisation keeps, summed per block and in total.

Retained fraction = kept energy / total energy, energy being the squared Frobenius norm (the sum of
squared singular values), so 1.0 means the LoRA reproduces the change exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BLOCK_PATTERN = re.compile(r"(down|up|input|output)_blocks_\d+|mid_block|middle_block")


@dataclass
class LayerResult:
    key: str
    rank: int
    kept: float  # squared Frobenius norm the chosen rank keeps
    total: float  # squared Frobenius norm of the whole change


@dataclass
class RetainedReport:
    layers: list[LayerResult] = field(default_factory=list)

    def add(self, key: str, rank: int, kept: float, total: float) -> None:
        self.layers.append(LayerResult(key, rank, kept, total))

    @property
    def total_fraction(self) -> float:
        return _fraction(sum(layer.kept for layer in self.layers), sum(layer.total for layer in self.layers))

    def by_block(self) -> dict[str, float]:
        kept: dict[str, float] = {}
        total: dict[str, float] = {}
        for layer in self.layers:
            block = block_of(layer.key)
            kept[block] = kept.get(block, 0.0) + layer.kept
            total[block] = total.get(block, 0.0) + layer.total
        return {block: _fraction(kept[block], total[block]) for block in kept}

    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers]

    def text(self) -> str:
        """Plain lines for the CLI, the tab and the API."""
        if not self.layers:
            return "No layer changed: nothing to keep."
        ranks = self.ranks()
        lines = [f"{len(self.layers)} layers, rank {min(ranks)}-{max(ranks)}, "
                 f"retained {100 * self.total_fraction:.2f}% of the change in total"]
        lines += [f"  {block}: {100 * fraction:.2f}%" for block, fraction in sorted(self.by_block().items())]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        return {"total": self.total_fraction, "blocks": self.by_block(),
                "layers": {layer.key: {"rank": layer.rank, "retained": _fraction(layer.kept, layer.total)}
                           for layer in self.layers}}


def _fraction(kept: float, total: float) -> float:
    return 1.0 if total <= 0 else min(1.0, kept / total)


def block_of(key: str) -> str:
    """A readable block name of a kohya key: 'unet down_blocks_1', 'unet input_blocks_4', 'te1', ..."""
    if key.startswith("lora_te"):
        return key.split("_text_model", 1)[0].removeprefix("lora_")
    match = BLOCK_PATTERN.search(key)
    return f"unet {match.group(0)}" if match else "unet"
