"""The world's pictures and captions: deterministic, and saying what is drawn."""

from __future__ import annotations

import numpy as np

from dreambooth.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    SUBJECT,
    Scene,
    caption,
    draw,
    random_scene,
    subject_images,
)


def test_pictures_are_deterministic_and_show_their_colours() -> None:
    scene = Scene("square", "blue", "white", radius=18.0)
    pixels = np.asarray(draw(scene))
    assert pixels.shape == (64, 64, 3) and (pixels == np.asarray(draw(scene))).all()
    assert tuple(pixels[32, 32]) == COLOURS["blue"] and tuple(pixels[1, 1]) == BACKGROUNDS["white"]
    dotted = np.asarray(draw(Scene("square", "blue", "white", radius=18.0, dot=True)))
    assert tuple(dotted[32, 32]) == (255, 255, 255)


def test_captions_name_what_is_drawn() -> None:
    assert caption(SUBJECT) == "a green circle with a white dot on grey"
    assert caption(SUBJECT, colour=False, background=False) == "a circle with a white dot"
    assert caption(Scene("star", "red", "black"), background=False) == "a red star"


def test_random_scenes_cover_the_world_for_a_seed() -> None:
    first = [random_scene(np.random.default_rng(5)) for _ in range(3)]
    assert first == [random_scene(np.random.default_rng(5)) for _ in range(3)]
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(400)]
    assert {s.colour for s in scenes} == set(COLOURS) and 0.15 < np.mean([s.dot for s in scenes]) < 0.35


def test_subject_pictures_vary_only_place_size_and_background() -> None:
    pictures = subject_images(6)
    assert {(s.shape, s.colour, s.dot) for s, _ in pictures} == {("circle", "green", True)}
    assert {s.background for s, _ in pictures} == set(BACKGROUNDS) and len({s.x for s, _ in pictures}) == 6
