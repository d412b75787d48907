"""sd-scripts prompt lines and per-concept sample prompts."""

from __future__ import annotations

import pytest

from dreambooth.config.schema import Concept, TrainingConfig
from dreambooth.errors import ConfigError
from dreambooth.generation import GenerationRequest
from dreambooth.train.sampling import parse_prompt_line, sample_prompts


def test_prompt_line_flags() -> None:
    parsed = parse_prompt_line("a cat, photo --n blurry, low quality --w 640 --h 384 --d 42 --l 6.5 --s 30",
                               GenerationRequest(""))
    assert parsed == GenerationRequest("a cat, photo", "blurry, low quality", seed=42, steps=30, cfg_scale=6.5,
                                       width=640, height=384)


def test_unknown_or_bad_flag_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="--x"):
        parse_prompt_line("a cat --x 3", GenerationRequest(""))
    with pytest.raises(ConfigError, match="--w big"):
        parse_prompt_line("a cat --w big", GenerationRequest(""))


def test_sample_prompts_per_concept_and_lines() -> None:
    concept = Concept(instance_prompt="[filewords]", instance_token="sks", class_token="dog", n_samples=2,
                      sample_seed=10, sample_steps=5)
    config = TrainingConfig(concepts=[concept], sample_prompts="a sks dog swimming --d 3\n# comment\n")
    prompts = sample_prompts(config, run_seed=99, resolution=64)
    assert [(p.prompt, p.seed, p.steps, p.width) for p in prompts] == [
        ("sks dog", 10, 5, 64), ("sks dog", 11, 5, 64), ("a sks dog swimming", 3, 20, 64)]
