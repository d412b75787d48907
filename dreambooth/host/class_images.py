"""Class (prior-preservation) images: where they live and generating the missing ones through the host.

Each image is written atomically as soon as it is rendered, with a caption file holding the class prompt,
so a crash or cancel keeps every finished image and a later call only renders what is still missing.
Image i of a folder is always rendered with seed `seed + i`, so a resumed generation matches an
uninterrupted one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_path, write_text
from ..config.schema import Concept, TrainingConfig
from ..errors import ConfigError
from ..store import ModelDir
from ..train.events import Progress, TrainCallbacks
from .base import GenerationRequest, Host

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_SEED = 1234  # used when the run's seed is -1 (random): class images stay reproducible


@dataclass
class ClassJob:
    """The images one concept still needs."""

    concept: Concept
    folder: Path
    missing: int


def image_name(index: int) -> str:
    return f"class_{index:05d}.png"


def free_indices(folder: Path, count: int) -> list[int]:
    """The first `count` indices whose file does not exist yet (never overwrite a user's image)."""
    indices: list[int] = []
    index = 0
    while len(indices) < count:
        if not (folder / image_name(index)).exists():
            indices.append(index)
        index += 1
    return indices


def consecutive_runs(indices: list[int], limit: int) -> list[tuple[int, int]]:
    """(start, count) runs of consecutive indices, at most `limit` long: one host request each."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][0] + runs[-1][1] == index and runs[-1][1] < limit:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs


def slug(text: str) -> str:
    """A short folder name for a prompt: letters, digits and underscores only."""
    cleaned = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return cleaned[:64] or "class"


def class_folder(model: ModelDir, concept: Concept) -> Path:
    """The concept's class folder: its own setting, else one per class prompt under the model's classifiers/."""
    if concept.class_data_dir.strip():
        return Path(concept.class_data_dir).expanduser()
    return model.class_images / slug(concept.class_prompt or concept.class_token)


def existing_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def missing_jobs(model: ModelDir, config: TrainingConfig) -> list[ClassJob]:
    """What each prior-preservation concept still lacks (concepts sharing a folder are counted once)."""
    if not config.with_prior_preservation or config.method == "finetune":
        return []
    jobs: dict[Path, ClassJob] = {}
    for index, concept in enumerate(config.concepts):
        if concept.num_class_images <= 0:
            continue
        if not (concept.class_prompt.strip() or concept.class_token.strip()):
            raise ConfigError(f"Concept {index + 1}: 'class_prompt' is empty but {concept.num_class_images} class "
                              "images are wanted; write a class prompt such as 'photo of a dog'.")
        folder = class_folder(model, concept)
        have = len(existing_images(folder))
        wanted = max(concept.num_class_images, jobs[folder].missing + have if folder in jobs else 0)
        jobs[folder] = ClassJob(concept, folder, max(0, wanted - have))
    return [job for job in jobs.values() if job.missing > 0]


def base_checkpoint_path(model_checkpoint: str, checkpoints_dir: Path) -> Path | None:
    """The host checkpoint a model was created from, if it is still there."""
    if not model_checkpoint:
        return None
    candidate = Path(model_checkpoint)
    if not candidate.is_absolute():
        candidate = checkpoints_dir / candidate
    return candidate if candidate.is_file() else None


def job_request(job: ClassJob, config: TrainingConfig, model: ModelDir, host: Host, start: int,
                count: int) -> GenerationRequest:
    concept = job.concept
    seed = (config.seed if config.seed >= 0 else DEFAULT_SEED) + start
    return GenerationRequest(
        prompt=concept.class_prompt or concept.class_token, negative_prompt=concept.class_negative_prompt,
        seed=seed, steps=concept.class_infer_steps, cfg_scale=concept.class_guidance_scale,
        width=config.resolution, height=config.resolution, count=count, batch_size=count,
        checkpoint=base_checkpoint_path(config.base_checkpoint, host.layout.checkpoints_dir),
        model_dir=model.working if model.working.is_dir() else None)


def save_image(image: object, path: Path, caption: str, caption_extension: str) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")  # type: ignore[attr-defined]
    write_text(path.with_suffix(caption_extension), caption + "\n")


def generate_missing(model: ModelDir, config: TrainingConfig, host: Host,
                     callbacks: TrainCallbacks | None = None,
                     interrupted: Callable[[], bool] | None = None, batch_size: int = 4) -> list[Path]:
    """Render every missing class image with the host; returns the new files. Stops early when interrupted."""
    callbacks = callbacks or TrainCallbacks()
    jobs = missing_jobs(model, config)
    total = sum(job.missing for job in jobs)
    written: list[Path] = []
    for job in jobs:
        job.folder.mkdir(parents=True, exist_ok=True)
        prompt = job.concept.class_prompt or job.concept.class_token
        callbacks.on_status(f"Generating {job.missing} class images for '{prompt}' in {job.folder}")
        for start, count in consecutive_runs(free_indices(job.folder, job.missing), max(1, batch_size)):
            if interrupted is not None and interrupted():
                callbacks.on_status(f"Class image generation interrupted after {len(written)} of {total}.")
                return written
            images = host.generate(job_request(job, config, model, host, start, count))
            for number, image in enumerate(images[:count]):
                path = job.folder / image_name(start + number)
                save_image(image, path, prompt, config.caption_extension)
                written.append(path)
            callbacks.on_progress(Progress(len(written), total, 0, 0, 0.0, 0.0))
    callbacks.on_status(f"Generated {len(written)} class images.")
    return written
