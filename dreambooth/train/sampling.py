"""Preview images during training: per-concept prompts and sd-scripts prompt lines, fixed seeds.

A prompt line reads `prompt --n negative --w 512 --h 512 --d seed --l cfg --s steps` (the flags of kohya's
sample prompts); an unknown flag is an error rather than silently part of the prompt.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..errors import ConfigError
from ..generation import GenerationRequest

# flag -> (GenerationRequest field, converter)
FLAGS: dict[str, tuple[str, type]] = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int),
                                      "d": ("seed", int), "l": ("cfg_scale", float), "s": ("steps", int)}
_FLAG_SPLIT = re.compile(r"(?:^|\s)--(?=[A-Za-z])")


def parse_prompt_line(line: str, defaults: GenerationRequest) -> GenerationRequest:
    """Parse one sd-scripts prompt line; raise ConfigError naming the setting for an unknown or bad flag."""
    parts = _FLAG_SPLIT.split(line.strip())
    values: dict[str, Any] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        flag, _, raw = part.partition(" ")
        if flag not in FLAGS:
            raise ConfigError(f"Setting 'sample_prompts': unknown flag '--{flag}' in {line.strip()!r}; "
                              f"use --n, --w, --h, --d, --l or --s.")
        name, convert = FLAGS[flag]
        try:
            values[name] = convert(raw.strip())
        except ValueError:
            raise ConfigError(f"Setting 'sample_prompts': '--{flag} {raw.strip()}' needs a "
                              f"{convert.__name__} value in {line.strip()!r}.") from None
    return replace(defaults, **values)


def _concept_prompt(concept: Any) -> str:
    prompt = concept.sample_prompt or concept.instance_prompt
    subject = " ".join(part for part in (concept.instance_token, concept.class_token) if part)
    return prompt.replace("[filewords]", subject).strip() or subject


def sample_prompts(config: Any, run_seed: int, resolution: int) -> list[GenerationRequest]:
    """The run's preview prompts: n_samples per concept (seeds sample_seed, +1, ...) then the prompt lines."""
    prompts = []
    for concept in config.concepts:
        seed = concept.sample_seed if concept.sample_seed >= 0 else run_seed
        base = GenerationRequest(_concept_prompt(concept), concept.sample_negative_prompt, seed, concept.sample_steps,
                                 concept.sample_guidance_scale, resolution, resolution)
        prompts += [replace(base, seed=seed + index) for index in range(concept.n_samples) if base.prompt]
    defaults = GenerationRequest("", seed=max(run_seed, 0), width=resolution, height=resolution)
    for line in config.sample_prompts.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            prompts.append(parse_prompt_line(line, defaults))
    return prompts


def render(pipeline: Any, prompt: GenerationRequest, device: torch.device) -> Any:
    from ..models.components import call_options

    generator = torch.Generator(device="cpu").manual_seed(prompt.seed)
    result = pipeline(prompt=prompt.prompt, negative_prompt=prompt.negative_prompt or None, width=prompt.width,
                      height=prompt.height, num_inference_steps=prompt.steps, guidance_scale=prompt.cfg_scale,
                      generator=generator, output_type="pil", **call_options(pipeline))
    return result.images[0]


def render_samples(pipeline: Any, prompts: list[GenerationRequest], folder: Path, step: int,
                   device: torch.device) -> list[Path]:
    """Render and save each prompt as samples/step-<step>-<index>-<seed>.png (atomic writes)."""
    paths = []
    pipeline.set_progress_bar_config(disable=True)
    for index, prompt in enumerate(prompts):
        image = render(pipeline, prompt, device)
        path = folder / f"step-{step:06d}-{index:02d}-seed{prompt.seed}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        paths.append(path)
    return paths
