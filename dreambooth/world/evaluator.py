"""Scoring generated pictures of the shapes world: which shape, colour and background, and whether a dot.

A small convolutional classifier, trained by `world.build` on drawn world pictures and on their round trips
through the world model's VAE (so that the soft edges of generated pictures are familiar), with one head per
attribute. Its shape head has a further class, "none", learnt from noise and blobs, so that a picture
without a recognisable shape never counts as one. Its weights ship beside the base model
(`resources/world/evaluator.safetensors`); its accuracy on held-out pictures is checked by the tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .model import EVALUATOR_FILE
from .scenes import ALL_COLOURS, BACKGROUNDS, SHAPES, SUBJECT, Scene

NO_SHAPE = "none"
SHAPE_CLASSES = (*SHAPES, NO_SHAPE)
COLOUR_CLASSES = tuple(ALL_COLOURS)
BACKGROUND_CLASSES = tuple(BACKGROUNDS)
HEADS = {"shape": SHAPE_CLASSES, "colour": COLOUR_CLASSES, "background": BACKGROUND_CLASSES, "dot": ("no", "yes")}


class ShapeNet(nn.Module):
    """Strided convolutions down to a 4x4 map whose every position feeds the heads (a shape is an arrangement,
    which global pooling would lose), one linear head per attribute."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, width // 2, width, width * 2, width * 2]
        for cin, cout in zip(channels, channels[1:], strict=False):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(4, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU()]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(channels[-1] * 16, len(classes))
                                    for name, classes in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixels)
        return {name: head(features) for name, head in self.heads.items()}


def pixels_of(images: Sequence[Any]) -> torch.Tensor:
    """PIL images or HxWx3 uint8 arrays -> (N, 3, 64, 64) floats in [-1, 1]."""
    arrays = [np.asarray(image.convert("RGB") if hasattr(image, "convert") else image) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass(frozen=True)
class Judgement:
    """What the evaluator sees in one picture; `confidence` is the shape head's probability of its answer."""

    shape: str
    colour: str
    background: str
    dot: bool
    confidence: float

    @property
    def recognised(self) -> bool:
        """A shape, named with more than even odds (an unsure guess at a blob is no shape)."""
        return self.shape != NO_SHAPE and self.confidence > 0.5

    def shows(self, scene: Scene) -> bool:
        """Whether the picture shows `scene`'s shape, colour and dot (background and place aside)."""
        return self.recognised and (self.shape, self.colour, self.dot) == (scene.shape, scene.colour, scene.dot)


class Evaluator:
    def __init__(self, net: ShapeNet):
        self.net = net.eval()

    def judge(self, images: Sequence[Any]) -> list[Judgement]:
        if not images:
            return []
        with torch.no_grad():
            logits = self.net(pixels_of(images))
        probabilities = {name: torch.softmax(value, dim=1) for name, value in logits.items()}
        picks = {name: value.argmax(dim=1).tolist() for name, value in probabilities.items()}
        return [Judgement(shape=SHAPE_CLASSES[picks["shape"][i]], colour=COLOUR_CLASSES[picks["colour"][i]],
                          background=BACKGROUND_CLASSES[picks["background"][i]], dot=bool(picks["dot"][i]),
                          confidence=float(probabilities["shape"][i, picks["shape"][i]]))
                for i in range(len(images))]


def load_evaluator(path: str | Path = EVALUATOR_FILE) -> Evaluator:
    from safetensors.torch import load_file

    net = ShapeNet()
    net.load_state_dict(load_file(str(path)))
    return Evaluator(net)


# --- measures over many pictures -------------------------------------------------------------------------

def rate(judgements: Sequence[Judgement], scene: Scene = SUBJECT) -> float:
    """The fraction of pictures that show `scene` (by default the DreamBooth subject)."""
    return sum(j.shows(scene) for j in judgements) / max(1, len(judgements))


def appearance(judgements: Iterable[Judgement]) -> dict[str, float]:
    """The distribution of what a prompt draws: 'colour+dot' (e.g. 'orange+dot', 'red') -> fraction."""
    labels = [f"{j.colour}+dot" if j.dot else j.colour for j in judgements if j.recognised]
    counts = Counter(labels)
    total = max(1, sum(counts.values()))
    return {label: count / total for label, count in counts.items()}


def total_variation(first: dict[str, float], second: dict[str, float]) -> float:
    """Half the L1 distance between two distributions: 0 the same, 1 nothing in common."""
    labels = set(first) | set(second)
    return 0.5 * sum(abs(first.get(label, 0.0) - second.get(label, 0.0)) for label in labels)
