"""Import settings files from elsewhere: the old DreamBooth extension's db_config.json and
concepts_list.json, our own config JSON, or a bare list of concepts.

Written from the public names of those files' keys only. Every key with a meaning here is mapped;
every other key is reported by name in `ImportResult.messages` ("ignored: key (why)").
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import io
from .schema import Concept, TrainingConfig, field_type, parse_value, settings, validate

# The model's own identity: an import never changes which weights the model is.
IDENTITY_FIELDS = ("model_name", "model_family", "prediction_type", "base_checkpoint")
CONCEPT_FIELDS = frozenset(f.name for f in settings(Concept))
CONFIG_FIELDS = frozenset(f.name for f in settings(TrainingConfig))
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_WINDOWS_PATH = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")


@dataclass
class ImportResult:
    """The merged, validated config and one line per key that was not imported or needs attention."""

    config: TrainingConfig
    messages: list[str] = field(default_factory=list)


class _NoEquivalent(Exception):
    """A value (not just a key) that has no counterpart here; the message says why."""


# --- value tables ------------------------------------------------------------------------------

SCHEDULER_NAMES = {
    "constant": "constant", "constant_with_warmup": "constant_with_warmup", "linear": "linear",
    "cosine": "cosine", "cosine_annealing": "cosine", "cosine_with_restarts": "cosine_with_restarts",
    "cosine_annealing_with_restarts": "cosine_with_restarts", "cosine_annealing_warm_restarts":
    "cosine_with_restarts", "polynomial": "polynomial", "rex": "rex",
}
# Optimizer names lower-cased with spaces, dashes and underscores removed.
OPTIMIZER_NAMES = {
    "adamw": "adamw", "torchadamw": "adamw", "8bitadamw": "adamw_8bit", "adamw8bit": "adamw_8bit",
    "lion": "lion", "8bitlion": "lion_8bit", "lion8bit": "lion_8bit", "prodigy": "prodigy",
    "adafactor": "adafactor", "adamwschedulefree": "adamw_schedulefree", "schedulefreeadamw": "adamw_schedulefree",
}
ATTENTION_NAMES = {"default": "sdpa", "sdp": "sdpa", "sdpa": "sdpa", "flash_attention": "sdpa",
                   "xformers": "xformers"}


def _lookup(table: dict[str, str], normalise: Callable[[str], str]) -> Callable[[Any], str]:
    def convert(raw: Any) -> str:
        key = normalise(str(raw))
        if key not in table:
            raise _NoEquivalent(f"{raw!r} has no equivalent here")
        return table[key]
    return convert


def _squash(text: str) -> str:
    return re.sub(r"[\s_\-]", "", text.lower())


def _bool(raw: Any) -> bool:
    return parse_value(TrainingConfig, "use_ema", raw)


# --- db_config.json: incumbent key -> (our field, converter) -----------------------------------

Converter = Callable[[Any], Any]
SETTING_MAP: dict[str, tuple[str, Converter | None]] = {
    "learning_rate": ("learning_rate", None),
    "txt_learning_rate": ("text_encoder_lr", None),
    "lr_scheduler": ("lr_scheduler", _lookup(SCHEDULER_NAMES, str.lower)),
    "lr_warmup_steps": ("lr_warmup_steps", None),
    "lr_cycles": ("lr_cycles", None),
    "lr_power": ("lr_power", None),
    "train_batch_size": ("train_batch_size", None),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", None),
    "max_train_steps": ("max_train_steps", None),
    "max_steps": ("max_train_steps", lambda raw: max(0, parse_value(TrainingConfig, "max_train_steps", raw))),
    "num_train_epochs": ("num_train_epochs", None),
    "prior_loss_weight": ("prior_loss_weight", None),
    "resolution": ("resolution", None),
    "mixed_precision": ("mixed_precision", None),
    "use_ema": ("use_ema", None),
    "save_ema": ("ema_for_output", None),
    "ema_decay": ("ema_decay", None),
    "train_unet": ("train_unet", None),
    "train_text_encoder": ("train_text_encoder", None),
    "seed": ("seed", None),
    "hflip": ("hflip", None),
    "gradient_checkpointing": ("gradient_checkpointing", None),
    "pad_tokens": ("pad_tokens", None),
    "max_token_length": ("max_token_length", None),
    "clip_skip": ("clip_skip", None),
    "shuffle_tags": ("shuffle_tags", None),
    "offset_noise": ("offset_noise", None),
    "min_snr_gamma": ("min_snr_gamma", None),
    "max_grad_norm": ("max_grad_norm", None),
    "adam_beta1": ("adam_beta1", None),
    "adam_beta2": ("adam_beta2", None),
    "adam_epsilon": ("adam_epsilon", None),
    "weight_decay": ("weight_decay", None),
    "adamw_weight_decay": ("weight_decay", None),
    "tf32_enable": ("allow_tf32", None),
    "optimizer": ("optimizer", _lookup(OPTIMIZER_NAMES, _squash)),
    "attention": ("attention", _lookup(ATTENTION_NAMES, str.lower)),
    "cache_latents": ("cache_latents", lambda raw: "memory" if _bool(raw) else "off"),
    "half_model": ("save_precision", lambda raw: "fp16" if _bool(raw) else "fp32"),
    "save_embedding_every": ("save_every_n_epochs", None),
    "scale_lr": ("scale_lr", lambda raw: "linear" if _bool(raw) else "none"),
    "lora_unet_rank": ("lora_rank", None),
    "lora_rank": ("lora_rank", None),
    "lora_alpha": ("lora_alpha", None),
    "lora_dropout": ("lora_dropout", None),
}

# Keys read by the special handlers in _apply_special (they depend on other keys).
SPECIAL_KEYS = frozenset({"use_lora", "use_lora_extended", "lora_learning_rate", "lora_txt_learning_rate",
                          "lora_txt_rank", "stop_text_encoder", "use_8bit_adam", "save_ckpt_after",
                          "save_lora_after", "concepts_list", "concepts_path", "use_concepts"})

IGNORED_REASONS: dict[str, str] = {
    **{key: "the model's own name, base and architecture are kept" for key in (
        "model_name", "model_dir", "model_path", "pretrained_model_name_or_path", "src", "v2", "model_type",
        "custom_model_name", "shared_diffusers_path", "use_shared_src", "has_ema", "pretrained_vae_name_or_path",
        "initial_revision", "sd_model_checkpoint", "model_family", "prediction_type", "base_checkpoint")},
    **{key: "a training progress counter, not a setting" for key in (
        "epoch", "revision", "lifetime_revision", "lifetime_epoch", "lifetime_step")},
    "save_preview_every": "previews here are every N steps: set sample_every_n_steps",
    "save_safetensors": "saves are always .safetensors here",
    "sample_batch_size": "class images are generated at the batch size memory allows",
    "sanity_prompt": "add it to sample_prompts instead",
    "sanity_seed": "previews use each concept's sample_seed",
    "lora_model_name": "LoRAs are named after the model",
    "noise_scheduler": "training always uses the base model's noise schedule",
}


# --- public API --------------------------------------------------------------------------------

def import_file(path: str | Path, base: TrainingConfig | None = None) -> ImportResult:
    """Import a db_config.json, concepts list or our own config JSON, merged into `base`."""
    path = Path(path)
    if path.suffix.lower() == ".toml":  # kohya sd-scripts' dataset config
        from .kohya import import_kohya_toml

        return import_kohya_toml(path, base)
    text = io.read_text_file(path, "Import file")
    return import_text(text, str(path), path.parent.resolve(), base)


def import_text(text: str, source_name: str = "pasted JSON", base_dir: str | Path | None = None,
                base: TrainingConfig | None = None) -> ImportResult:
    """Import JSON text (e.g. pasted into the tab); relative folders resolve against `base_dir`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        from .kohya import looks_like_kohya_dataset

        if looks_like_kohya_dataset(text):
            raise ConfigError(f"{source_name} is a kohya dataset config (TOML), not JSON: save it as a .toml file "
                              "and import that file.") from None
        raise ConfigError(f"{source_name} is not valid JSON (line {error.lineno}, column {error.colno}: "
                          f"{error.msg}); fix the JSON and import again.") from None
    return import_data(data, source_name, Path(base_dir) if base_dir is not None else None, base)


def import_data(data: Any, source: str, base_dir: Path | None = None,
                base: TrainingConfig | None = None) -> ImportResult:
    """Import already-parsed JSON of any supported kind."""
    importer = _Importer(source, base_dir, copy.deepcopy(base) if base is not None else TrainingConfig())
    if isinstance(data, list):
        importer.set_concepts(data, "concepts list")
    elif isinstance(data, dict) and ("concepts" in data or "version" in data):
        importer.import_ours(data)
    elif isinstance(data, dict) and set(data) <= CONCEPT_FIELDS | set(CONCEPT_ALIASES) and data:
        importer.set_concepts([data], "single concept")
    elif isinstance(data, dict):
        importer.import_settings(data)
    else:
        raise ConfigError(f"{source}: expected a JSON object (settings) or a list of concepts, "
                          f"found {type(data).__name__}.")
    return importer.finish(base)


# --- concepts ----------------------------------------------------------------------------------

# Incumbent concept key -> our Concept field, for keys whose value carries over unchanged.
CONCEPT_ALIASES: dict[str, str] = {
    "save_sample_prompt": "sample_prompt",
    "save_sample_negative_prompt": "sample_negative_prompt",
    "n_save_sample": "n_samples",
    "save_guidance_scale": "sample_guidance_scale",
    "save_infer_steps": "sample_steps",
    "num_class_images_per": "",
    "max_steps": "",
    "file_prompt_contents": "",
    "save_sample_template": "",
}
PATH_FIELDS = ("instance_data_dir", "class_data_dir")


class _Importer:
    def __init__(self, source: str, base_dir: Path | None, config: TrainingConfig):
        self.source = source
        self.base_dir = base_dir
        self.config = config
        self.messages: list[str] = []
        self.unset_ignored: list[str] = []
        self.concepts_from_incumbent = False

    # ---- our own format
    def import_ours(self, data: dict[str, Any]) -> None:
        imported = io.from_dict(data, self.source, warn=self.messages.append)
        for f in settings(TrainingConfig):  # identity fields are put back from the base in finish()
            setattr(self.config, f.name, getattr(imported, f.name))
        if "concepts" in data:
            self.config.concepts = imported.concepts
            for index, concept in enumerate(self.config.concepts):
                self._resolve_paths(concept, index)

    # ---- incumbent db_config.json
    def import_settings(self, data: dict[str, Any]) -> None:
        for key, raw in data.items():
            if key in SETTING_MAP:
                self._set_mapped(key, raw)
            elif key in CONFIG_FIELDS and key not in IDENTITY_FIELDS:
                self._set_field(key, key, raw)
            elif key not in SPECIAL_KEYS:
                self._ignore(key, raw, IGNORED_REASONS.get(key, "no equivalent setting here"))
        self._apply_special(data)

    def _set_mapped(self, key: str, raw: Any) -> None:
        name, convert = SETTING_MAP[key]
        if raw is None:
            return
        try:
            value = convert(raw) if convert else raw
        except _NoEquivalent as why:
            self.messages.append(f"ignored: {key} ({why}; kept {name}={getattr(self.config, name)!r})")
            return
        except ConfigError:
            raise ConfigError(f"{self.source}: '{key}' must be true or false, not {raw!r}.") from None
        self._set_field(key, name, value)

    def _set_field(self, key: str, name: str, raw: Any) -> None:
        if _unset(TrainingConfig, name, raw):
            return
        try:
            setattr(self.config, name, parse_value(TrainingConfig, name, raw))
        except ConfigError as error:
            raise ConfigError(f"{self.source}: '{key}': {error}") from None

    def _ignore(self, key: str, raw: Any, why: str) -> None:
        if raw in (None, "", False, [], {}):
            self.unset_ignored.append(key)
        else:
            self.messages.append(f"ignored: {key} ({why})")

    def _apply_special(self, data: dict[str, Any]) -> None:
        use_lora = self._flag(data, "use_lora")
        if use_lora is not None:
            self.config.method = "lora" if use_lora else "dreambooth"
        self._apply_lora_extras(data, bool(use_lora))
        self._apply_text_encoder_stop(data)
        if self._flag(data, "use_8bit_adam") and "optimizer" not in data:
            self.config.optimizer = "adamw_8bit"
        save_key = "save_lora_after" if self.config.method == "lora" else "save_ckpt_after"
        save_after = self._flag(data, save_key)
        if save_after is not None:
            self.config.save_on_end = save_after
        self._apply_concepts(data)

    def _flag(self, data: dict[str, Any], key: str) -> bool | None:
        if data.get(key) is None:
            return None
        try:
            return _bool(data[key])
        except ConfigError:
            raise ConfigError(f"{self.source}: '{key}' must be true or false, not {data[key]!r}.") from None

    def _apply_lora_extras(self, data: dict[str, Any], use_lora: bool) -> None:
        for key, name in (("lora_learning_rate", "learning_rate"), ("lora_txt_learning_rate", "text_encoder_lr")):
            if key in data and use_lora:
                self._set_field(key, name, data[key])
            elif key in data:
                self._ignore(key, data[key], "LoRA is off in this file")
        txt_rank = data.get("lora_txt_rank")
        if txt_rank is not None and txt_rank != self.config.lora_rank:
            self.messages.append(f"ignored: lora_txt_rank ({txt_rank!r}; one LoRA rank is used for UNet and text "
                                 f"encoder here: lora_rank={self.config.lora_rank})")
        if self._flag(data, "use_lora_extended"):
            self.config.lora_conv_rank = self.config.lora_rank

    def _apply_text_encoder_stop(self, data: dict[str, Any]) -> None:
        raw = data.get("stop_text_encoder")
        if _unset(TrainingConfig, "stop_text_encoder", raw):
            return
        try:
            stop = float(raw) if isinstance(raw, bool) else parse_value(TrainingConfig, "stop_text_encoder", raw)
        except ConfigError as error:
            raise ConfigError(f"{self.source}: 'stop_text_encoder': {error}") from None
        # The old extension expresses "don't train the text encoder" as stopping it at 0.
        self.config.train_text_encoder = stop > 0
        if stop > 0:
            self.config.stop_text_encoder = min(stop, 1.0)

    def _apply_concepts(self, data: dict[str, Any]) -> None:
        if data.get("concepts_list") is not None:
            self.set_concepts(data["concepts_list"], "concepts_list")
        elif data.get("concepts_path") and data.get("use_concepts", True):
            self._concepts_from_file(str(data["concepts_path"]))

    def _concepts_from_file(self, raw_path: str) -> None:
        if self.base_dir is None:
            # Pasted text must not make the server read files it names; import that file instead.
            self.messages.append(f"ignored: concepts_path ('{raw_path}'; import that concepts list file itself)")
            return
        path = Path(self.resolve_path(raw_path, "concepts_path"))
        if not path.is_file():
            self.messages.append(f"ignored: concepts_path ({raw_path!r} not found; import the concepts list "
                                 "file itself)")
            return
        try:
            concepts = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{self.source}: concepts_path {path} cannot be read as JSON ({error}).") from None
        self.set_concepts(concepts, str(path))

    def set_concepts(self, raw: Any, where: str) -> None:
        if not isinstance(raw, list):
            raise ConfigError(f"{self.source}: {where} must be a list of concept objects, "
                              f"found {type(raw).__name__}.")
        concepts = []
        for index, item in enumerate(raw):
            if not isinstance(item, dict):
                raise ConfigError(f"{self.source}: concept {index + 1} must be a JSON object with keys such as "
                                  f"instance_data_dir, found {type(item).__name__} {item!r:.40}.")
            concepts.append(self._concept(item, index))
        self.config.concepts = concepts
        self.concepts_from_incumbent = any(key in CONCEPT_ALIASES for item in raw for key in item)

    def _concept(self, data: dict[str, Any], index: int) -> Concept:
        concept = Concept()
        for key, raw in data.items():
            name = key if key in CONCEPT_FIELDS else CONCEPT_ALIASES.get(key)
            if name and not _unset(Concept, name, raw):
                self._set_concept_field(concept, index, key, name, raw)
            elif name is None:
                self._ignore(f"concepts[{index}].{key}", raw, "no equivalent concept setting here")
        self._concept_specials(concept, index, data)
        self._resolve_paths(concept, index)
        if not _unset(Concept, "num_class_images", data.get("num_class_images_per")) \
                and "num_class_images" not in data:
            self._class_images_per(concept, index, data["num_class_images_per"])
        return concept

    def _set_concept_field(self, concept: Concept, index: int, key: str, name: str, raw: Any) -> None:
        try:
            setattr(concept, name, parse_value(Concept, name, raw))
        except ConfigError as error:
            raise ConfigError(f"{self.source}: concept {index + 1} '{key}': {error}") from None

    def _concept_specials(self, concept: Concept, index: int, data: dict[str, Any]) -> None:
        where = f"concepts[{index}]"
        if data.get("file_prompt_contents") and not concept.instance_prompt:
            # Old files said "use the caption file" this way; [filewords] is how prompts say it now.
            concept.instance_prompt = "[filewords]"
        elif "file_prompt_contents" in data:
            self._ignore(f"{where}.file_prompt_contents", data["file_prompt_contents"],
                         "the instance prompt decides; put [filewords] in it to use captions")
        if "save_sample_template" in data:
            self._ignore(f"{where}.save_sample_template", data["save_sample_template"],
                         "add those prompts to sample_prompts, one per line")
        self._concept_max_steps(index, data.get("max_steps"))

    def _concept_max_steps(self, index: int, raw: Any) -> None:
        if raw is None or raw == "" or (isinstance(raw, (int, float)) and raw <= 0):
            return
        if index == 0 and self.config.max_train_steps == 0:
            self._set_field(f"concepts[{index}].max_steps", "max_train_steps", raw)
            self.messages.append(f"mapped: concepts[{index}].max_steps -> max_train_steps={raw!r} (step limits "
                                 "are per run here, not per concept)")
        else:
            self.messages.append(f"ignored: concepts[{index}].max_steps ({raw!r}; step limits are per run here: "
                                 "set max_train_steps)")

    def _class_images_per(self, concept: Concept, index: int, raw: Any) -> None:
        # The old files count class images per instance image; here a concept has a total.
        try:
            per = parse_value(Concept, "num_class_images", raw)
        except ConfigError as error:
            raise ConfigError(f"{self.source}: concept {index + 1} 'num_class_images_per': {error}") from None
        images = count_images(concept.instance_data_dir)
        if images is None and per > 0:
            self.messages.append(f"concept {index + 1}: num_class_images_per={per} could not be converted to a "
                                 "total (instance folder not readable); set num_class_images by hand")
        concept.num_class_images = max(per, 0) * (images or 0)

    # ---- paths
    def _resolve_paths(self, concept: Concept, index: int) -> None:
        for name in PATH_FIELDS:
            raw = getattr(concept, name)
            if raw:
                setattr(concept, name, self.resolve_path(raw, f"concept {index + 1} {name}"))
        folder = concept.instance_data_dir
        if folder and not _WINDOWS_PATH.match(folder) and not os.path.isdir(folder):
            self.messages.append(f"concept {index + 1}: instance_data_dir '{folder}' does not exist on this "
                                 "machine; fix the path before training")

    def resolve_path(self, raw: str, where: str) -> str:
        """Absolute paths stay; relative ones resolve against the JSON file's folder."""
        if _WINDOWS_PATH.match(raw):
            if os.name != "nt":
                self.messages.append(f"{where}: '{raw}' is a Windows path, which does not exist on this "
                                     "machine; fix the path to where the folder is here")
            return raw
        text = os.path.expanduser(raw)
        if os.name != "nt" and "\\" in text and not os.path.exists(text):
            text = text.replace("\\", "/")
            self.messages.append(f"{where}: Windows separators in '{raw}' read as '/'")
        if os.path.isabs(text):
            return os.path.normpath(text)
        if self.base_dir is None:
            self.messages.append(f"{where}: relative path '{raw}' kept as given (no file folder to resolve "
                                 "it against); use an absolute path")
            return raw
        return os.path.normpath(self.base_dir / text)

    # ---- result
    def finish(self, base: TrainingConfig | None) -> ImportResult:
        if base is not None:
            for name in IDENTITY_FIELDS:
                setattr(self.config, name, getattr(base, name))
        if self.concepts_from_incumbent and self.config.concepts and \
                not any(c.num_class_images for c in self.config.concepts) and self.config.with_prior_preservation:
            # The old extension trained without prior loss when no concept asked for class images.
            self.config.with_prior_preservation = False
            self.messages.append("with_prior_preservation turned off: no concept asks for class images")
        if self.unset_ignored:
            self.messages.append(f"ignored (unset or off, nothing to import): {', '.join(self.unset_ignored)}")
        try:
            validate(self.config)
        except ConfigError as error:
            raise ConfigError(f"{self.source}: {error}") from None
        return ImportResult(self.config, self.messages)


def _unset(cls: type, name: str, raw: Any) -> bool:
    """None, or an empty string for a non-text field: the old files write both for 'not set'."""
    return raw is None or (raw == "" and field_type(cls, name) is not str)


def count_images(folder: str) -> int | None:
    """Images directly in `folder`, or None when it cannot be listed."""
    if not folder:
        return None
    try:
        return sum(1 for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError:
        return None
