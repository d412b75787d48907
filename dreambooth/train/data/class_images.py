"""Class (prior-preservation) images: count what is there, generate the rest through the host.

Generated files are named `<hash of prompt + negative prompt>-<seed>.png`, so a rerun finds and
reuses them, an interrupted run continues where it stopped, and a changed prompt starts a new set
(the old files stay; nothing is deleted). Files already in the folder - generated or the user's own
- count towards the requested number.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, PngImagePlugin

from ...atomic import atomic_path
from ...config.schema import Concept, TrainingConfig
from ...errors import DataError
from ...generation import GenerationRequest
from ...imagefiles import is_image_name
from .concepts import (
    class_folder,
    class_prompt_of,
    concept_labels,
    expand_concepts,
    prior_active,
    prompt_hash,
)
from .images import ImageProblem, probe


class ImageGenerator(Protocol):
    """What class-image generation needs of a host (every `host.base.Host` is one)."""

    def generate(self, request: GenerationRequest) -> list[Any]: ...

    def interrupted(self) -> bool: ...


@dataclass
class ClassImageJob:
    concept_index: int
    folder: Path
    prompt: str
    negative_prompt: str
    missing: int
    seeds: list[int]
    file_names: list[str]
    guidance_scale: float = 7.5
    steps: int = 20
    size: tuple[int, int] = (512, 512)
    present: int = 0


def count_usable(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.is_file() and is_image_name(p) and not p.name.startswith(".")
               and _usable(p))


def _usable(path: Path) -> bool:
    try:
        probe(path)
    except ImageProblem:
        return False
    return True


def plan_class_images(config: TrainingConfig, class_root: Path) -> list[ClassImageJob]:
    """One job per concept that has fewer class images than requested (none without prior loss)."""
    if not prior_active(config):
        return []
    concepts, _ = expand_concepts(config)
    labels = concept_labels(config, concepts)
    jobs = [_job(i, c, config, class_root, labels[i]) for i, c in enumerate(concepts) if c.num_class_images > 0]
    return [job for job in jobs if job.missing > 0]


def _job(index: int, concept: Concept, config: TrainingConfig, class_root: Path, label: str) -> ClassImageJob:
    prompt = class_prompt_of(concept)
    if not prompt:
        fix = ("add the class word to the folder's name (e.g. '3_ohwx dog') or set the concept's 'Class prompt'"
               if ", folder '" in label else "set 'Class prompt' (e.g. 'photo of a dog')")
        raise DataError(f"{label}: {concept.num_class_images} class images are requested but it has no class "
                        f"prompt or class token; {fix}.")
    folder = class_folder(concept, class_root)
    assert folder is not None  # class_root is given
    present = count_usable(folder)
    missing = max(0, concept.num_class_images - present)
    stem = prompt_hash(prompt, concept.class_negative_prompt)
    seeds = list(_free_seeds(folder, stem, missing))
    return ClassImageJob(index, folder, prompt, concept.class_negative_prompt, missing, seeds,
                         [_name(stem, s) for s in seeds], concept.class_guidance_scale, concept.class_infer_steps,
                         (config.resolution, config.resolution), present)


def _name(stem: str, seed: int) -> str:
    return f"{stem}-{seed}.png"


def _free_seeds(folder: Path, stem: str, count: int) -> Iterator[int]:
    """The lowest seeds whose file does not exist yet (an existing but unusable file is left alone)."""
    seed = 0
    while count > 0:
        if not (folder / _name(stem, seed)).exists():
            yield seed
            count -= 1
        seed += 1


def consecutive_runs(seeds: list[int], batch_size: int) -> list[list[int]]:
    """Split seeds into runs of consecutive values, at most batch_size long (one host call each)."""
    runs: list[list[int]] = []
    for seed in seeds:
        if runs and runs[-1][-1] == seed - 1 and len(runs[-1]) < batch_size:
            runs[-1].append(seed)
        else:
            runs.append([seed])
    return runs


def base_checkpoint_path(base_checkpoint: str, checkpoints_dir: Path) -> Path | None:
    """The host checkpoint a model was created from, if it is still there (class images come from the base)."""
    if not base_checkpoint:
        return None
    candidate = Path(base_checkpoint)
    if not candidate.is_absolute():
        candidate = checkpoints_dir / candidate
    return candidate if candidate.is_file() else None


def generate_class_images(config: TrainingConfig, class_root: Path, host: ImageGenerator,
                          on_progress: Callable[[int, int], None] | None = None, batch_size: int = 4,
                          checkpoint: Path | None = None, model_dir: Path | None = None) -> int:
    """Generate every missing class image; stop between batches when the host is interrupted.

    Returns the number of images written.
    """
    jobs = plan_class_images(config, class_root)
    total = sum(job.missing for job in jobs)
    written = 0
    for job in jobs:
        job.folder.mkdir(parents=True, exist_ok=True)
        names = dict(zip(job.seeds, job.file_names, strict=True))
        for run in consecutive_runs(job.seeds, max(1, batch_size)):
            if host.interrupted():
                return written
            request = GenerationRequest(job.prompt, job.negative_prompt, run[0], job.steps, job.guidance_scale,
                                        job.size[0], job.size[1], len(run), len(run), checkpoint, model_dir)
            # A host may return fewer images than asked (e.g. interrupted mid-batch): save those.
            for image, seed in zip(host.generate(request), run, strict=False):
                picture = _as_pil(image)
                _refuse_black(picture, job, seed, host)
                save_png(picture, job.folder / names[seed], _parameters(job, seed))
                written += 1
                if on_progress:
                    on_progress(written, total)
    return written


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    raise DataError(f"The host returned a {type(image).__name__} instead of an image while generating class "
                    "images; update the extension or the web UI.")


def _refuse_black(picture: Image.Image, job: ClassImageJob, seed: int, host: ImageGenerator) -> None:
    """An all-black picture is a failed render (a model that computed NaN, e.g. a half-precision VAE overflowing,
    comes out black in A1111 and Forge); trained on as a class image it would teach the class to be black."""
    if any(high > 0 for _, high in picture.convert("RGB").getextrema()):
        return
    raise DataError(f"The host ({getattr(host, 'name', 'web UI')}) rendered an all-black picture for the class "
                    f"prompt {job.prompt!r} (seed {seed}): its model failed to render (NaN, e.g. a half-precision "
                    "VAE). Make a txt2img with that model work there (A1111/Forge: --no-half-vae or full "
                    "precision), then generate the class images again; none of the black ones was kept.")


def _parameters(job: ClassImageJob, seed: int) -> str:
    negative = f"\nNegative prompt: {job.negative_prompt}" if job.negative_prompt else ""
    return (f"{job.prompt}{negative}\nSteps: {job.steps}, CFG scale: {job.guidance_scale}, Seed: {seed}, "
            f"Size: {job.size[0]}x{job.size[1]}")


def save_png(image: Image.Image, target: Path, parameters: str) -> None:
    """Write a PNG atomically, with the web UI's 'parameters' text so it shows its prompt and seed."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
