"""Pre-flight checks: setting conflicts and unusable data found before any training starts.

Each check returns Findings that name the settings involved and the fix.  Errors mean the run would
fail or a setting would silently do nothing; warnings mean it runs but probably not as intended.

Latent caching and augmentation: a random crop picks a new window every time an image is seen, which
a cached latent cannot do, so the two conflict (error).  A horizontal flip does not conflict: the VAE is
close to flip-equivariant and a cache holds (or flips) both orientations, as kohya's sd-scripts does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config.schema import (
    Concept,
    TrainingConfig,
    text_cache_blockers,
    training_resolutions,
    uses_prior_preservation,
)
from ..errors import ConfigError
from ..families import ModelFamily, get_family
from ..imagefiles import IMAGE_EXTENSIONS, is_image_name

KOHYA_FOLDER = re.compile(r"^\d+_")
SAMPLE_FLAGS = {"n": str, "w": int, "h": int, "d": int, "l": float, "s": int}


@dataclass(frozen=True)
class Finding:
    level: str  # 'error' or 'warning'
    settings: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


def _error(settings: tuple[str, ...], message: str) -> Finding:
    return Finding("error", settings, message)


def _warning(settings: tuple[str, ...], message: str) -> Finding:
    return Finding("warning", settings, message)


# --- data on disk ----------------------------------------------------------------------------------

def count_images(folder: str) -> int | None:
    """Images in `folder` and in its kohya-style 'N_identifier class' subfolders; None when it is missing
    or unreadable."""
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    count = sum(1 for name in names if is_image_name(name))
    for name in names:
        path = os.path.join(folder, name)
        if KOHYA_FOLDER.match(name) and os.path.isdir(path):
            count += count_images(path) or 0
    return count


def _images_in(folder: str, dataset_info: Mapping[str, int] | None) -> int | None:
    if dataset_info is not None and folder in dataset_info:
        return dataset_info[folder]
    return count_images(folder)


# --- the checks ------------------------------------------------------------------------------------

def check_text_encoder_cache(config: TrainingConfig, family: str = "sd1") -> list[Finding]:
    if config.cache_text_encoder_outputs != "on":
        return []  # auto caches only where the result stays the same; off never does
    encoders = "the text encoders'" if len(get_family(family).text_encoders) > 1 else "the text encoder's"
    return [_error(("cache_text_encoder_outputs", name),
                   f"'cache_text_encoder_outputs' on keeps {encoders} output for each caption, but {why} ('{name}'): "
                   f"set it to auto or off, or change '{name}'.") for name, why in text_cache_blockers(config)]


def check_device(config: TrainingConfig, device: str) -> list[Finding]:
    if device != "cpu":
        return []
    findings = []
    if config.mixed_precision == "fp16":
        findings.append(_error(("mixed_precision",), "'mixed_precision' fp16 needs a CUDA GPU and this run is on "
                               "the CPU: choose bf16 (fast on recent CPUs) or no."))
    if config.attention == "xformers":
        findings.append(_warning(("attention",), "'attention' xformers needs a CUDA GPU; on the CPU training "
                                 "falls back to sdpa: choose sdpa."))
    return findings


def check_latent_cache_augmentation(config: TrainingConfig) -> list[Finding]:
    if config.cache_latents == "off" or not config.random_crop:
        return []
    return [_error(("cache_latents", "random_crop"), "'random_crop' picks a new crop each time an image is seen, "
                   f"but 'cache_latents' ({config.cache_latents}) encodes one crop once: turn off 'random_crop' or "
                   "set 'cache_latents' to off.")]


def check_resolutions(config: TrainingConfig, family: str = "sd1", native: int | None = None) -> list[Finding]:
    """Resolutions the VAE (and the denoiser's patches) can take, and within what the model handles well
    (`native`: the model's own native resolution, when its architecture is not the family's released one)."""
    try:
        resolutions = training_resolutions(config)
    except ConfigError as error:
        return [_error(("extra_resolutions",), str(error))]
    unit = get_family(family)
    multiple = max(64, unit.pixel_multiple) if config.enable_bucketing else unit.pixel_multiple
    reason = "with aspect-ratio buckets ('enable_bucketing')" if config.enable_bucketing else f"for {unit.label}"
    bad = [r for r in resolutions if r % multiple]
    if bad:
        fixes = ", ".join(f"{r} -> {max(multiple, round(r / multiple) * multiple)}" for r in bad)
        return [_error(("resolution", "extra_resolutions"), f"Training resolutions must be multiples of "
                       f"{multiple} {reason}: change {fixes}.")]
    return _resolution_range(resolutions, unit, native)


def _resolution_range(resolutions: list[int], unit: ModelFamily, native: int | None) -> list[Finding]:
    low, high = unit.resolution_range
    name = unit.label
    if native is not None and native != unit.resolution:
        # A model of its own size (the demo's, the shapes world's) works around its own native size.
        low, high, name = native // 2, native * 2, f"This {unit.label} model"
    outside = [r for r in resolutions if not low <= r <= high]
    if not outside:
        return []
    return [_warning(("resolution", "extra_resolutions"), f"{name} works between {low} and {high} px "
                     f"(native {native or unit.resolution}); {', '.join(map(str, outside))} px trains poorly or "
                     "wastes memory: choose a resolution in that range.")]


def model_native_resolution(working: Path, family: str) -> int | None:
    """The native resolution a saved model's own configs give (denoiser sample size times the VAE's
    downscale), or None when they do not say."""
    unit = get_family(family)
    try:
        denoiser = json.loads((working / unit.denoiser_folder / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((working / "vae" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size, blocks = denoiser.get("sample_size"), vae.get("block_out_channels")
    if not isinstance(size, int) or not blocks:
        return None
    return size * 2 ** (len(blocks) - 1)


def check_concepts(config: TrainingConfig, dataset_info: Mapping[str, int] | None) -> list[Finding]:
    if not config.concepts:
        return [_error(("concepts",), "No concept to train: add a concept with an instance images folder.")]
    findings = []
    for index, concept in enumerate(config.concepts, start=1):
        finding = _concept_images(index, concept, dataset_info)
        if finding:
            findings.append(finding)
    return findings


def _concept_images(index: int, concept: Concept, dataset_info: Mapping[str, int] | None) -> Finding | None:
    folder = concept.instance_data_dir
    settings = ("concepts", "instance_data_dir")
    if not folder.strip():
        return _error(settings, f"Concept {index}: 'instance_data_dir' is empty: choose the folder with your images.")
    count = _images_in(folder, dataset_info)
    if count is None:
        return _error(settings, f"Concept {index}: 'instance_data_dir' {folder} does not exist or cannot be read: "
                      "check the path and its permissions.")
    if count == 0:
        return _error(settings, f"Concept {index}: 'instance_data_dir' {folder} holds no images "
                      f"({', '.join(IMAGE_EXTENSIONS)}): add images or fix the path.")
    return None


@dataclass(frozen=True)
class _Sized:
    path: str
    size: tuple[int, int]


def image_sizes(folder: str) -> list[_Sized]:
    """(path, size) of the images in `folder` and its kohya-style subfolders, from their headers only."""
    from PIL import Image

    sized = []
    for path in _image_paths(folder):
        try:
            with Image.open(path) as image:
                sized.append(_Sized(path, image.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # unreadable images are reported by the dataset scan
    return sized


def _image_paths(folder: str) -> list[str]:
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    paths = [os.path.join(folder, n) for n in names if is_image_name(n) and not n.startswith(".")]
    for name in names:
        if KOHYA_FOLDER.match(name) and os.path.isdir(os.path.join(folder, name)):
            paths += _image_paths(os.path.join(folder, name))
    return paths


def check_image_sizes(config: TrainingConfig) -> list[Finding]:
    """Images far below the training resolution or of extreme aspect: counted per concept (they train, badly)."""
    from ..train.data.images import size_warnings

    try:
        resolution = min(training_resolutions(config))
    except ConfigError:
        return []  # reported by check_resolutions
    findings = []
    for index, concept in enumerate(config.concepts, start=1):
        if concept.instance_data_dir.strip():
            messages = size_warnings(f"Concept {index}", image_sizes(concept.instance_data_dir), resolution)
            findings += [_warning(("resolution", "instance_data_dir"), message) for message in messages]
    return findings


def _uses_prior(config: TrainingConfig) -> bool:
    return uses_prior_preservation(config)


def check_prior_preservation(config: TrainingConfig) -> list[Finding]:
    if not _uses_prior(config):
        return []
    findings = []
    for index, concept in enumerate(config.concepts, start=1):
        if not concept.class_prompt.strip() and not concept.class_data_dir.strip():
            findings.append(_error(("with_prior_preservation", "class_prompt", "class_data_dir"),
                                   f"Concept {index}: 'with_prior_preservation' needs class images, but neither "
                                   "'class_prompt' (to generate them) nor 'class_data_dir' (to read them) is set: "
                                   "set a class prompt such as 'photo of a dog', or turn prior preservation off."))
        elif concept.num_class_images == 0:
            findings.append(_warning(("with_prior_preservation", "num_class_images"),
                                     f"Concept {index}: 'with_prior_preservation' is on with 'num_class_images' 0, "
                                     "so the prior loss has nothing to train on: set a count (the wizard "
                                     "suggests one) or turn prior preservation off."))
    return findings


def check_class_image_supply(config: TrainingConfig, dataset_info: Mapping[str, int] | None) -> list[Finding]:
    """More class images requested than exist, with no class prompt to generate the rest."""
    if not _uses_prior(config):
        return []
    findings = []
    for index, concept in enumerate(config.concepts, start=1):
        if concept.class_prompt.strip() or not concept.class_data_dir.strip():
            continue
        have = _images_in(concept.class_data_dir, dataset_info) or 0
        if concept.num_class_images > have:
            findings.append(_error(("num_class_images", "class_prompt", "class_data_dir"),
                                   f"Concept {index}: 'num_class_images' is {concept.num_class_images} but "
                                   f"'class_data_dir' {concept.class_data_dir} holds {have} and without a "
                                   f"'class_prompt' none can be generated: set a class prompt, add images, or "
                                   f"lower 'num_class_images' to {have}."))
    return findings


def check_run_length(config: TrainingConfig) -> list[Finding]:
    if config.max_train_steps == 0 and config.num_train_epochs == 0:
        return [_error(("max_train_steps", "num_train_epochs"), "'max_train_steps' and 'num_train_epochs' are both "
                       "0, so nothing would be trained: set one of them (the wizard computes both).")]
    return []


def images_per_epoch(concept: Concept, dataset_info: Mapping[str, int] | None) -> int | None:
    """Instance images one epoch of `concept` sees: its images x its repeats, where kohya-style folders count
    with the repeats of their names (a `10_sks dog` subfolder, or the concept's folder itself when its own
    repeats are unset), as the dataset scan trains them."""
    folder = concept.instance_data_dir
    if dataset_info is not None and folder in dataset_info:
        return dataset_info[folder] * concept.repeats
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    own = KOHYA_FOLDER.match(os.path.basename(os.path.normpath(folder)))
    repeats = int(own.group(0)[:-1]) if own and concept.repeats == 1 else concept.repeats
    total = sum(1 for name in names if is_image_name(name)) * repeats
    for name in names:
        path = os.path.join(folder, name)
        if KOHYA_FOLDER.match(name) and os.path.isdir(path):
            total += (count_images(path) or 0) * int(name.split("_", 1)[0])
    return total


def run_steps(config: TrainingConfig, dataset_info: Mapping[str, int] | None) -> int | None:
    """Optimizer steps of the run, when known: max steps, or epochs of the dataset as the trainer plans them
    (buckets, resolutions, repeats, class images on disk). With `dataset_info` (image counts instead of the
    folders), or images that cannot be read, all images count as one bucket."""
    from ..train.data.runlength import config_run_length, counted_batches, estimate_run_length

    if config.max_train_steps > 0:
        return config.max_train_steps
    planned = estimate_run_length(config) if dataset_info is None else None
    if planned is not None:
        return planned.total_steps
    counts = [images_per_epoch(c, dataset_info) for c in config.concepts]
    if not counts or any(count is None for count in counts):
        return None
    return config_run_length(config, counted_batches(counts, config.train_batch_size)).total_steps  # type: ignore[arg-type]


def check_save_intervals(config: TrainingConfig, dataset_info: Mapping[str, int] | None) -> list[Finding]:
    steps = run_steps(config, dataset_info)
    epochs = config.num_train_epochs if config.max_train_steps == 0 else None
    too_long = [(name, value, "steps", steps) for name, value in (
        ("save_every_n_steps", config.save_every_n_steps), ("snapshot_every_n_steps", config.snapshot_every_n_steps))
        if steps and value > steps]
    if epochs and config.save_every_n_epochs > epochs:
        too_long.append(("save_every_n_epochs", config.save_every_n_epochs, "epochs", epochs))
    findings = []
    for name, value, unit, length in too_long:
        level = _warning if config.save_on_end else _error
        consequence = "only the final save happens" if config.save_on_end else "nothing is ever saved"
        findings.append(level((name, "max_train_steps" if unit == "steps" else "num_train_epochs"),
                              f"'{name}' is {value} but the run is {length} {unit}, so {consequence}: lower "
                              f"'{name}' below {length} or set it to 0."))
    return findings


def sample_prompt_problems(text: str) -> list[str]:
    """Problems in sd-scripts style prompt lines ('prompt --n neg --w 512 --h 512 --d 1 --l 7 --s 20')."""
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        for position, token in enumerate(tokens):
            if not token.startswith("--"):
                continue
            flag = token[2:]
            following = tokens[position + 1] if position + 1 < len(tokens) else ""
            value = "" if following.startswith("--") else following
            if flag not in SAMPLE_FLAGS:
                known = " ".join("--" + name for name in SAMPLE_FLAGS)
                problems.append(f"line {number}: unknown flag '--{flag}' (known: {known})")
            elif SAMPLE_FLAGS[flag] is not str and not _parses(SAMPLE_FLAGS[flag], value):
                problems.append(f"line {number}: '--{flag}' needs a number, got {shlex.quote(value)}")
    return problems


def _parses(kind: Callable[[str], object], value: str) -> bool:
    try:
        kind(value)
    except ValueError:
        return False
    return True


def check_sample_prompts(config: TrainingConfig) -> list[Finding]:
    problems = sample_prompt_problems(config.sample_prompts)
    return [_error(("sample_prompts",), f"'sample_prompts' {problem}: fix or remove it.") for problem in problems]


def preflight(config: TrainingConfig, family: str | None = None, device: str = "cpu",
              dataset_info: Mapping[str, int] | None = None, native: int | None = None) -> list[Finding]:
    """Every finding for a config about to train on `device` ('cpu' or 'cuda').

    `dataset_info` maps a folder to its image count, to skip reading the disk for folders already
    counted (the tab does this); other folders are listed.  `family` defaults to the config's; `native` is the
    model's own native resolution (model_native_resolution) when known.
    """
    family = family or config.model_family
    findings = []
    findings += check_text_encoder_cache(config, family)
    findings += check_device(config, device)
    findings += check_latent_cache_augmentation(config)
    findings += check_resolutions(config, family, native)
    findings += check_concepts(config, dataset_info)
    findings += check_image_sizes(config)
    findings += check_prior_preservation(config)
    findings += check_class_image_supply(config, dataset_info)
    findings += check_run_length(config)
    findings += check_save_intervals(config, dataset_info)
    findings += check_sample_prompts(config)
    return findings


def raise_on_errors(findings: list[Finding]) -> None:
    """Raise ConfigError listing every error finding (warnings pass)."""
    errors = [finding.message for finding in findings if finding.level == "error"]
    if errors:
        raise ConfigError("Training cannot start:\n" + "\n".join(f"- {message}" for message in errors))
