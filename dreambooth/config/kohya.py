"""kohya sd-scripts' dataset config (`--dataset_config`, a TOML file) read as our concepts and settings.

The file's layout (sd-scripts docs/config_README): `[general]` options apply to every dataset, each
`[[datasets]]` may override them, and each `[[datasets.subsets]]` is one image folder. In DreamBooth style a
subset's `class_tokens` is "<instance token> <class word>" ("sks dog"), `num_repeats` its repeats, and a
subset with `is_reg = true` holds regularisation (our class) images. Options have the same meaning at every
level; the innermost wins, as in sd-scripts. What has no counterpart here (fine-tuning `metadata_file`
subsets, colour augmentation, ...) is reported by name.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .schema import Concept, TrainingConfig, parse_value, validate

# sd-scripts option -> our setting, for options whose value carries over unchanged.
SETTINGS = {"resolution": "resolution", "batch_size": "train_batch_size", "caption_extension": "caption_extension",
            "shuffle_caption": "shuffle_tags", "keep_tokens": "keep_tokens", "enable_bucket": "enable_bucketing",
            "min_bucket_reso": "bucket_min_resolution", "max_bucket_reso": "bucket_max_resolution",
            "bucket_reso_steps": "bucket_step", "bucket_no_upscale": "bucket_no_upscale", "flip_aug": "hflip",
            "random_crop": "random_crop", "caption_dropout_rate": "caption_dropout"}
SUBSET_KEYS = {"image_dir", "class_tokens", "num_repeats", "is_reg"}


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """The TOML document as a dict; ConfigError naming the file and line when it is not valid TOML."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(f"{source}: reading TOML needs Python 3.11 or the 'tomli' package "
                              "(pip install tomli).") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source} is not valid TOML ({error}); fix it and import again.") from None


def looks_like_kohya_dataset(text: str) -> bool:
    return "[[datasets]]" in text or "[[datasets.subsets]]" in text or text.lstrip().startswith("[general]")


def kohya_to_ours(data: dict[str, Any], source: str, base_dir: Path | None) -> tuple[dict[str, Any], list[str]]:
    """(our config as a JSON-like dict with 'concepts', messages) from a parsed kohya dataset config."""
    general = data.get("general", {})
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise ConfigError(f"{source}: no [[datasets]] table; this is not a kohya dataset config.")
    messages = [f"ignored: {key} (top-level table, not a dataset option)" for key in data
                if key not in ("general", "datasets")]
    settings: dict[str, Any] = {}
    instance: list[dict[str, Any]] = []
    regularisation: list[dict[str, Any]] = []
    for number, dataset in enumerate(datasets, start=1):
        options = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        for index, subset in enumerate(dataset.get("subsets", []), start=1):
            where = f"datasets {number}, subset {index}"
            merged = {**options, **subset}
            _take_settings(merged, settings, messages, where)
            folder = _subset_folder(merged, base_dir)
            if folder is None:
                messages.append(f"ignored: {where} (no image_dir; fine-tuning 'metadata_file' subsets are not "
                                "supported: use image folders with caption files)")
                continue
            entry = {"folder": folder, "tokens": str(merged.get("class_tokens", "")).split(),
                     "repeats": int(merged.get("num_repeats", 1))}
            (regularisation if merged.get("is_reg") else instance).append(entry)
    if not instance:
        raise ConfigError(f"{source}: no subset with training images (every subset is is_reg or lacks image_dir).")
    concepts = [_concept(entry, regularisation, messages, alone=len(instance) == 1) for entry in instance]
    return {**settings, "concepts": concepts}, list(dict.fromkeys(messages))


def _take_settings(merged: dict[str, Any], settings: dict[str, Any], messages: list[str], where: str) -> None:
    for key, value in merged.items():
        if key in SUBSET_KEYS:
            continue
        ours = SETTINGS.get(key)
        if ours is None:
            messages.append(f"ignored: {key} (no equivalent here)")
        elif key == "resolution" and isinstance(value, list):
            settings[ours] = min(int(v) for v in value)
            messages.append(f"resolution {value}: trained at {settings[ours]} px with aspect-ratio buckets")
        elif ours in settings and settings[ours] != value:
            messages.append(f"{key}: {where} says {value!r} but an earlier subset {settings[ours]!r}; one value "
                            f"applies to the whole model here, the first is kept")
        else:
            settings.setdefault(ours, value)


def _subset_folder(merged: dict[str, Any], base_dir: Path | None) -> str | None:
    """The subset's image folder; a relative one is relative to the TOML file's folder."""
    raw = merged.get("image_dir")
    if not raw:
        return None
    path = Path(str(raw)).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return str(path)


def _concept(entry: dict[str, Any], regularisation: list[dict[str, Any]], messages: list[str],
             alone: bool) -> dict[str, Any]:
    """Our concept for an instance subset; its class images are the is_reg subset of the same class word (or
    the only one, when there is one instance subset)."""
    tokens = entry["tokens"]
    token, class_word = (tokens[0], " ".join(tokens[1:])) if tokens else ("", "")
    concept: dict[str, Any] = {"instance_data_dir": entry["folder"], "instance_token": token,
                               "class_token": class_word, "instance_prompt": "", "repeats": entry["repeats"]}
    matching = [r for r in regularisation if " ".join(r["tokens"]).lower() == class_word.lower()]
    chosen = matching or (regularisation if alone and len(regularisation) == 1 else [])
    if chosen:
        concept["class_data_dir"] = chosen[0]["folder"]
        concept["class_prompt"] = " ".join(chosen[0]["tokens"])
        if len(chosen) > 1:
            messages.append(f"class images for '{class_word}': several is_reg subsets match; "
                            f"{chosen[0]['folder']} is used")
    return concept


def defaults_note(config: TrainingConfig) -> str | None:
    """Prior preservation stays as the model has it: say whether the imported class folders are used."""
    with_class = [c for c in config.concepts if c.class_data_dir]
    if with_class and not config.with_prior_preservation:
        return ("is_reg subsets became class folders, but prior preservation is off for this model: turn on "
                "'with_prior_preservation' to train with them")
    return None


def import_kohya_toml(path: Path, base: TrainingConfig | None = None) -> Any:
    """An ImportResult: `base` with the dataset config's concepts (replacing its own) and mapped options."""
    from .io import read_text_file
    from .legacy import ImportResult

    path = Path(path)
    source = f"Dataset config {path}"
    ours, messages = kohya_to_ours(parse_toml(read_text_file(path, "Import file"), source), source,
                                   path.parent.resolve())
    config = copy.deepcopy(base) if base is not None else TrainingConfig()
    try:
        for name, value in ours.items():
            if name != "concepts":
                setattr(config, name, parse_value(TrainingConfig, name, value))
        config.concepts = [Concept(**{k: parse_value(Concept, k, v) for k, v in c.items()}) for c in ours["concepts"]]
        validate(config)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    before = len(base.concepts) if base is not None else 0
    messages.insert(0, f"concepts: {len(config.concepts)} from the dataset config's subsets"
                       + (f" (replacing the model's {before})" if before else ""))
    note = defaults_note(config)
    return ImportResult(config, messages + ([note] if note else []))
