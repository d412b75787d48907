"""Scanning concept folders into a DatasetPlan: usable images, captions, masks, skips with reasons.

Nothing here modifies or deletes a user's file: unusable files are listed in `skipped` with the
reason and the fix, and the tab's dataset preview shows them.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ...config.schema import Concept, TrainingConfig, training_resolutions
from ...errors import DataError
from ...imagefiles import MASK_SUFFIX, is_image_name
from .buckets import BucketSpec, bucket_for, bucket_spec, too_small_reason
from .captions import FILEWORDS, caption_path, class_caption, estimated_tokens, instance_caption, read_caption
from .concepts import class_folder, concept_labels, expand_concepts_noted, folder_of, prior_active
from .images import ImageProblem, mask_path_for, probe, size_warnings

# Extensions of image formats we do not read, so they are reported instead of silently ignored.
UNSUPPORTED_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".jxl", ".psd", ".svg", ".ico", ".tga", ".jfif",
                                ".raw", ".cr2", ".nef", ".dng", ".arw", ".exr", ".hdr")


@dataclass(frozen=True)
class ImageRecord:
    """One usable training image."""

    path: Path
    caption: str            # after [filewords]/token substitution, before shuffle/dropout
    concept_index: int
    is_class: bool
    mask_path: Path | None  # '<image stem>-masklabel.png' beside the image, if present
    size: tuple[int, int]   # (width, height) after EXIF transpose
    content_hash: str       # hash of the file bytes (for cache invalidation)


@dataclass
class DatasetPlan:
    instance: list[ImageRecord]
    class_images: list[ImageRecord]
    validation: list[ImageRecord]
    skipped: list[tuple[Path, str]]
    repeats: dict[int, int]
    concepts: list[Concept]
    warnings: list[str] = field(default_factory=list)


@dataclass
class ConceptScan:
    """Everything found for one effective concept; `error` is set when it cannot train at all."""

    index: int
    concept: Concept
    instance_dir: Path | None
    class_dir: Path | None
    images: list[ImageRecord] = field(default_factory=list)
    validation: list[ImageRecord] = field(default_factory=list)
    class_images: list[ImageRecord] = field(default_factory=list)
    class_missing: int = 0
    captions: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Shown by the dataset preview; a training run gets them from the pre-flight check (guide.preflight).
    size_warnings: list[str] = field(default_factory=list)
    error: str | None = None


def scan_dataset(config: TrainingConfig, class_root: Path | None = None,
                 warn: Callable[[str], None] | None = None) -> DatasetPlan:
    """Scan every concept; raise DataError naming the concept and folder when one cannot train."""
    if not config.concepts:
        raise DataError("No concepts configured; add a concept with an instance images folder.")
    concepts, skipped_folders, notes = expand_concepts_noted(config)
    labels = concept_labels(config, concepts)
    scans = [scan_concept(i, c, config, class_root, labels[i]) for i, c in enumerate(concepts)]
    for scan in scans:
        if scan.error:
            raise DataError(scan.error)
    plan = _plan(scans, concepts, skipped_folders)
    plan.warnings[:0] = notes
    if warn:
        for message in plan.warnings + skip_messages(plan.skipped):
            warn(message)
    return plan


def skip_messages(skipped: list[tuple[Path, str]], limit: int = 10) -> list[str]:
    """One line per skipped file (the first `limit`), then a count of the rest."""
    lines = [f"Skipped {path}: {reason}." for path, reason in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"... and {len(skipped) - limit} more skipped file(s); the dataset preview lists them all.")
    return lines


def _plan(scans: list[ConceptScan], concepts: list[Concept], skipped: list[tuple[Path, str]]) -> DatasetPlan:
    plan = DatasetPlan([], [], [], list(skipped), {}, concepts)
    for scan in scans:
        plan.instance += scan.images
        plan.validation += scan.validation
        plan.class_images += scan.class_images
        plan.skipped += scan.skipped
        plan.warnings += scan.warnings
        plan.repeats[scan.index] = scan.concept.repeats
    return plan


def scan_concept(index: int, concept: Concept, config: TrainingConfig, class_root: Path | None,
                 label: str | None = None) -> ConceptScan:
    """Scan one effective concept without raising; problems land in error/skipped/warnings.

    `label` names the concept in messages (see concepts.concept_labels); default 'Concept <index + 1>'."""
    label = label or f"Concept {index + 1}"
    instance_dir = folder_of(concept.instance_data_dir) if concept.instance_data_dir.strip() else None
    scan = ConceptScan(index, concept, instance_dir, class_folder(concept, class_root))
    scan.error = _folder_error(label, instance_dir)
    if scan.error:
        return scan
    specs = [bucket_spec(config, r) for r in training_resolutions(config)]
    images = _scan_folder(instance_dir, scan, config, specs, is_class=False)
    if not images:
        scan.error = _empty_error(label, instance_dir, scan.skipped)
        return scan
    scan.validation, scan.images = split_validation(images, config.validation_split)
    scan.size_warnings = size_warnings(label, images, min(training_resolutions(config)))
    if prior_active(config):
        _scan_class_images(scan, config, specs, label)
    if config.masked_training:
        _warn_missing_masks(scan, label)
    _warn_missing_captions(scan, label, images)
    return scan


def _warn_missing_captions(scan: ConceptScan, label: str, images: list[ImageRecord]) -> None:
    """[filewords] with images that have no caption file: say what they train with instead."""
    if FILEWORDS not in scan.concept.instance_prompt or scan.captions == len(images):
        return
    missing = [r for r in images if caption_path(r.path, ".txt") is None]
    if missing:
        scan.warnings.append(f"{label}: {len(missing)} image(s) have no caption file (e.g. {missing[0].path.name}); "
                             f"they train with '{missing[0].caption}'. Add .txt captions beside them if that is "
                             "not what you want.")


def _folder_error(label: str, folder: Path | None) -> str | None:
    if folder is None:
        return f"{label}: 'Instance images folder' is empty; set it to the folder that holds your images."
    if folder.is_dir():
        try:
            next(folder.iterdir(), None)
        except OSError as error:
            return f"{label}: instance images folder {folder} cannot be read ({error.strerror}); check its permissions."
        return None
    hint = " (a Windows path does not work on Linux)" if "\\" in str(folder) or ":" in str(folder)[:3] else ""
    what = "is not a folder" if folder.exists() else "does not exist"
    return f"{label}: instance images folder {folder} {what}{hint}; check the path in the concept's settings."


def _empty_error(label: str, folder: Path, skipped: list[tuple[Path, str]]) -> str:
    detail = f" ({len(skipped)} file(s) skipped, e.g. {skipped[0][1]})" if skipped else ""
    return (f"{label}: no usable images in {folder}{detail}; add PNG/JPEG/WebP images or remove the concept.")


def _scan_folder(folder: Path, scan: ConceptScan, config: TrainingConfig, specs: list[BucketSpec],
                 is_class: bool) -> list[ImageRecord]:
    records = []
    try:
        entries = sorted(folder.iterdir())
    except OSError as error:
        scan.skipped.append((folder, f"folder {folder} cannot be read ({error.strerror}); check its permissions"))
        return records
    for path in entries:
        link_problem = _broken_link(path)
        if link_problem:
            scan.skipped.append((path, link_problem))
            continue
        if not path.is_file():
            continue
        reason = _unusable_name(path)
        if reason == "":
            continue
        if reason:
            scan.skipped.append((path, reason))
            continue
        record = _record(path, scan, config, specs, is_class)
        if record is not None:
            records.append(record)
    return records


def _broken_link(path: Path) -> str | None:
    """Why a symbolic link cannot be followed (it loops, or an image link points nowhere), else None.

    Path.is_file() is simply False for both, which would drop the file without a word."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return (f"{path.name} is a symbolic link that loops back on itself, not followed; point it at a file or "
                    "delete it")
        if is_image_name(path):
            return f"{path.name} is a symbolic link to {os.readlink(path)}, which does not exist; fix or delete it"
    return None


def _unusable_name(path: Path) -> str | None:
    """'' for files that are not images and are not reported, a reason, or None when worth probing."""
    name, suffix = path.name, path.suffix.lower()
    if name.lower().endswith(MASK_SUFFIX) or (not is_image_name(path) and suffix not in UNSUPPORTED_IMAGE_EXTENSIONS):
        return ""
    if suffix in UNSUPPORTED_IMAGE_EXTENSIONS:
        return f"{name}: {suffix} images are not supported; convert it to PNG or JPEG"
    if name.startswith("."):
        return f"{name} is a hidden file (often a macOS '._' metadata file), not trained; delete it if unwanted"
    return None


def _record(path: Path, scan: ConceptScan, config: TrainingConfig, specs: list[BucketSpec],
            is_class: bool) -> ImageRecord | None:
    try:
        size, digest = probe(path)
    except ImageProblem as problem:
        scan.skipped.append((path, f"{path.name} {problem}"))
        return None
    if not _fits_some_resolution(path, size, specs, scan):
        return None
    caption = _caption(path, scan, config, is_class)
    mask = _mask(path, size, scan, config)
    return ImageRecord(path, caption, scan.index, is_class, mask, size, digest)


def _fits_some_resolution(path: Path, size: tuple[int, int], specs: list[BucketSpec], scan: ConceptScan) -> bool:
    fitting = [s.resolution for s in specs if bucket_for(size, s) is not None]
    if not fitting:
        scan.skipped.append((path, f"{path.name} {too_small_reason(size, specs)}"))
        return False
    if len(fitting) < len(specs):
        scan.warnings.append(f"{path} is too small for some resolutions; it trains only at "
                             f"{', '.join(map(str, fitting))} px.")
    return True


def _caption(path: Path, scan: ConceptScan, config: TrainingConfig, is_class: bool) -> str:
    text = _sidecar_text(path, scan, config)
    if text is not None and not is_class:
        scan.captions += 1
    caption = class_caption(scan.concept, text) if is_class else instance_caption(scan.concept, text)
    if not caption:
        scan.warnings.append(f"{path} has no caption and its concept no prompt: it trains with an empty "
                             f"prompt; add {path.stem}{config.caption_extension} or set the concept's prompt.")
    elif estimated_tokens(caption) > config.max_token_length:
        scan.warnings.append(f"Caption of {path} is over {config.max_token_length} tokens; the end is cut off "
                             "unless 'Max tokens' is raised. Shorten it if the end matters.")
    return caption


def _sidecar_text(path: Path, scan: ConceptScan, config: TrainingConfig) -> str | None:
    sidecar = caption_path(path, config.caption_extension)
    if sidecar is None:
        return None
    try:
        text, warning = read_caption(sidecar)
    except OSError as error:
        scan.warnings.append(f"Caption {sidecar} cannot be read ({error.strerror}); the prompt is used instead.")
        return None
    if warning:
        scan.warnings.append(warning)
    if not text:
        scan.warnings.append(f"Caption {sidecar} is empty; the concept's prompt is used instead.")
        return None
    return text


def _mask(path: Path, size: tuple[int, int], scan: ConceptScan, config: TrainingConfig) -> Path | None:
    mask = mask_path_for(path)
    if not mask.is_file():
        return None
    if config.masked_training:
        try:
            probe(mask)
        except ImageProblem as problem:
            scan.warnings.append(f"Mask {mask} {problem}; {path.name} trains without a mask.")
            return None
    return mask


def _warn_missing_masks(scan: ConceptScan, label: str) -> None:
    missing = [r.path.name for r in scan.images if r.mask_path is None]
    if missing:
        scan.warnings.append(f"{label}: {len(missing)} image(s) have no '-masklabel.png' mask (e.g. {missing[0]}); "
                             "they train without a mask.")


def split_validation(records: list[ImageRecord], fraction: float) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(validation, training): a fixed `fraction` chosen by content hash, so the split never changes
    with file order or renames; at least one image always stays in training."""
    count = min(int(len(records) * fraction + 0.5), len(records) - 1) if fraction > 0 else 0
    if count <= 0:
        return [], list(records)
    ranked = sorted(records, key=lambda r: hashlib.sha1(f"validation:{r.content_hash}".encode()).hexdigest())
    held_out = {id(r) for r in ranked[:count]}
    return ([r for r in records if id(r) in held_out], [r for r in records if id(r) not in held_out])


def _scan_class_images(scan: ConceptScan, config: TrainingConfig, specs: list[BucketSpec], label: str) -> None:
    wanted = scan.concept.num_class_images
    folder = scan.class_dir
    found: list[ImageRecord] = []
    if folder is not None and folder.is_dir():
        found = _scan_folder(folder, scan, config, specs, is_class=True)
    elif folder is not None and scan.concept.class_data_dir.strip() and not wanted:
        scan.warnings.append(f"{label}: class folder {folder} does not exist; check the path or set 'Class images' "
                             "to generate some.")
    # 0 requested: use whatever the folder holds and generate nothing.
    scan.class_images = found[:wanted] if wanted else found
    scan.class_missing = max(0, wanted - len(found))
    if scan.class_missing:
        scan.warnings.append(f"{label}: {scan.class_missing} of {wanted} class images are missing in {folder}; "
                             "they are generated before training.")
    elif not scan.class_images:
        scan.warnings.append(f"{label}: prior preservation is on but there are no class images; this concept "
                             "trains without prior loss. Set 'Class images' to generate some.")


def bucket_counts(records: list[ImageRecord], spec: BucketSpec) -> dict[str, int]:
    """'WxH' -> number of records in that bucket at one resolution (for the preview)."""
    counts = Counter(bucket_for(r.size, spec) for r in records)
    return {f"{b[0]}x{b[1]}": n for b, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0] or (0, 0))) if b}
