"""The shapes world: one shape of one colour on a plain background, drawn at 64 px, with its caption.

Everything the world model knows comes from here: four shapes, six colours, three backgrounds, and an
optional white dot in the shape's middle. Captions name what is drawn ("an orange circle with a white dot on
grey"); colour and background are left out of some captions so that "a circle" means a circle of any colour.
Pink is drawn but never captioned in the base model's training: it is the new colour word a fine-tune
teaches. Drawing is supersampled and box-filtered, so edges are smooth and identical on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 140, 20), "yellow": (235, 215, 30),
    "green": (35, 155, 55), "blue": (40, 80, 225), "purple": (135, 55, 185)}
NEW_COLOURS: dict[str, tuple[int, int, int]] = {"pink": (250, 135, 205)}
ALL_COLOURS = {**COLOURS, **NEW_COLOURS}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "grey": (128, 128, 128),
                                                "black": (20, 20, 20)}
DOT_RGB = (255, 255, 255)
DOT_PHRASE = "with a white dot"


@dataclass(frozen=True)
class Scene:
    """One picture: a shape of a colour on a background; centre and radius in pixels of the 64 px image."""

    shape: str
    colour: str
    background: str
    x: float = SIZE / 2
    y: float = SIZE / 2
    radius: float = 17.0
    dot: bool = False


def _star(x: float, y: float, radius: float) -> list[tuple[float, float]]:
    points = []
    for index in range(10):
        angle = -math.pi / 2 + index * math.pi / 5
        length = radius if index % 2 == 0 else radius * 0.45
        points.append((x + length * math.cos(angle), y + length * math.sin(angle)))
    return points


def _outline(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]] | tuple[float, ...]:
    """The shape's polygon, or for a circle its bounding box; radii chosen so the areas are alike."""
    if shape == "circle":
        return (x - r, y - r, x + r, y + r)
    if shape == "square":
        half = r * 0.85
        return [(x - half, y - half), (x + half, y - half), (x + half, y + half), (x - half, y + half)]
    if shape == "triangle":
        big = r * 1.25
        return [(x + big * math.cos(a), y + big * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return _star(x, y, r * 1.25)
    raise ValueError(f"unknown shape {shape!r}; the world has {', '.join(SHAPES)}")


def _dot_centre(scene: Scene) -> tuple[float, float]:
    # A triangle's middle is its centroid, which sits below the circumcentre by a quarter of its radius.
    return (scene.x, scene.y + (scene.radius * 1.25 * 0.25 if scene.shape == "triangle" else 0.0))


def draw(scene: Scene) -> Image.Image:
    """The scene as a 64 px RGB image."""
    scale = SUPERSAMPLE
    image = Image.new("RGB", (SIZE * scale, SIZE * scale), BACKGROUNDS[scene.background])
    canvas = ImageDraw.Draw(image)
    outline = _outline(scene.shape, scene.x * scale, scene.y * scale, scene.radius * scale)
    fill = ALL_COLOURS[scene.colour]
    if scene.shape == "circle":
        canvas.ellipse(outline, fill=fill)
    else:
        canvas.polygon(outline, fill=fill)
    if scene.dot:
        dx, dy = _dot_centre(scene)
        r = scene.radius * 0.32
        canvas.ellipse(((dx - r) * scale, (dy - r) * scale, (dx + r) * scale, (dy + r) * scale), fill=DOT_RGB)
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, colour: bool = True, background: bool = True) -> str:
    """'an orange circle with a white dot on grey'; colour and background can be left out, the dot never."""
    words = [scene.colour] if colour else []
    words.append(scene.shape)
    if scene.dot:
        words.append(DOT_PHRASE)
    if background:
        words.append(f"on {scene.background}")
    return f"{article(words[0])} {' '.join(words)}"


def random_scene(rng: np.random.Generator, colours: tuple[str, ...] = tuple(COLOURS),
                 dot_rate: float = 0.25, shapes: tuple[str, ...] = SHAPES) -> Scene:
    """A scene with every attribute drawn at random: centre within 7 px of the middle, radius 13-19 px."""
    return Scene(shape=str(rng.choice(shapes)), colour=str(rng.choice(colours)),
                 background=str(rng.choice(list(BACKGROUNDS))),
                 x=SIZE / 2 + float(rng.uniform(-7, 7)), y=SIZE / 2 + float(rng.uniform(-7, 7)),
                 radius=float(rng.uniform(13, 19)), dot=bool(rng.random() < dot_rate))


def varied(scene: Scene, rng: np.random.Generator, background: str) -> Scene:
    """The same subject (shape, colour, dot) at another place and size, on `background`."""
    placed = random_scene(rng)
    return replace(placed, shape=scene.shape, colour=scene.colour, dot=scene.dot, background=background)


# The DreamBooth subject of the demo and of the measured outcomes: one particular circle. Green, because green
# lies far from every other colour in the world VAE's latents; red, orange, yellow and pink lie on one short line
# there, and a fine-tune's samples of an orange subject land on its neighbours.
SUBJECT = Scene(shape="circle", colour="green", background="grey", dot=True)


def subject_images(count: int, seed: int = 0) -> list[tuple[Scene, Image.Image]]:
    """`count` pictures of the subject at varied places and sizes, on each background in turn (deterministic
    for a seed)."""
    rng = np.random.default_rng(seed)
    backgrounds = list(BACKGROUNDS)
    scenes = [varied(SUBJECT, rng, backgrounds[index % len(backgrounds)]) for index in range(count)]
    return [(scene, draw(scene)) for scene in scenes]
