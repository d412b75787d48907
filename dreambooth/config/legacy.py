"""Import settings files from elsewhere: the old DreamBooth extension's db_config.json and
concepts_list.json, our own config JSON, or a bare list of concepts.

Written from the public names of those files' keys and what the old extension did with them (see
docs/INCUMBENT_FIELDS.md). Every key with a meaning here is mapped with that meaning; every other key
is reported by name in `ImportResult.messages` ("ignored: key (why)").

One rule for every entry point: an import merges onto the model's current config (keys the file does
not name keep their value), unless `replace=True` asks for a full replace. Either way the model's
identity (IDENTITY_FIELDS) is kept, and concepts are never replaced by nothing without a message.
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
from ..imagefiles import is_image_name
from . import incumbent_eras, io
from .schema import MAX_CONCEPTS, Concept, TrainingConfig, field_type, parse_value, settings, validate

# The model's own identity: an import never changes which weights the model is.
IDENTITY_FIELDS = ("model_name", "model_family", "prediction_type", "base_checkpoint")
# Identity fields that can be corrected through the explicit path (CLI --set-identity, API flag);
# the name is the model folder's.
CORRECTABLE_IDENTITY = ("model_family", "prediction_type", "base_checkpoint")
CONCEPT_FIELDS = frozenset(f.name for f in settings(Concept))
CONFIG_FIELDS = frozenset(f.name for f in settings(TrainingConfig))
_WINDOWS_PATH = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")


@dataclass
class ImportResult:
    """The merged, validated config and one line per key that was not imported or needs attention."""

    config: TrainingConfig
    messages: list[str] = field(default_factory=list)


class IdentityChange(ConfigError):
    """An edit or import that would change which weights the model is (family, prediction, base)."""


class _NoEquivalent(Exception):
    """A value (not just a key) that has no counterpart here; the message says why."""


# --- value tables ------------------------------------------------------------------------------

SCHEDULER_NAMES = {
    "constant": "constant", "constant_with_warmup": "constant_with_warmup", "linear": "linear",
    "linear_with_warmup": "linear",
    "cosine": "cosine", "cosine_annealing": "cosine", "cosine_with_restarts": "cosine_with_restarts",
    "cosine_annealing_with_restarts": "cosine_with_restarts", "cosine_annealing_warm_restarts":
    "cosine_with_restarts", "polynomial": "polynomial", "rex": "rex",
}
# Optimizer names lower-cased with spaces, dashes and underscores removed.
OPTIMIZER_NAMES = {
    "adamw": "adamw", "torchadamw": "adamw", "8bitadamw": "adamw_8bit", "adamw8bit": "adamw_8bit",
    "lion": "lion", "8bitlion": "lion_8bit", "lion8bit": "lion_8bit", "prodigy": "prodigy",
    "adafactor": "adafactor", "adamwschedulefree": "adamw_schedulefree", "schedulefreeadamw": "adamw_schedulefree",
    # Paged variants move optimizer state to CPU memory under pressure; the update is the same.
    "paged8bitadamw": "adamw_8bit", "pagedadamw8bit": "adamw_8bit", "paged8bitlion": "lion_8bit",
    "pagedlion8bit": "lion_8bit",
}
# What to use instead of the old extension's optimizers that have no counterpart here.
OPTIMIZER_HINTS = {"dadaptation": "use prodigy (it also finds its own LR; set LR 1.0)",
                   "sgd": "use adamw, or lion for the lowest memory", "apollo": "use adamw",
                   "came": "use adafactor (both factor their second moments)", "sophia": "use adamw",
                   "tiger": "use lion (Tiger is a Lion variant)"}
# The old extension's preview sampler names (diffusers scheduler class names without 'Scheduler',
# lower-cased and squashed) -> sample_scheduler.
SAMPLER_NAMES = {"ddim": "ddim", "eulerdiscrete": "euler", "euler": "euler", "eulerancestraldiscrete": "euler_a",
                 "eulera": "euler_a", "eulerancestral": "euler_a", "dpmsolvermultistep": "dpmpp_2m",
                 "dpm++2m": "dpmpp_2m", "dpmpp2m": "dpmpp_2m"}
ATTENTION_NAMES = {"default": "sdpa", "sdp": "sdpa", "sdpa": "sdpa", "flash_attention": "sdpa",
                   "xformers": "xformers"}


def _lookup(table: dict[str, str], normalise: Callable[[str], str],
            hints: dict[str, str] | None = None) -> Callable[[Any], str]:
    def convert(raw: Any) -> str:
        key = normalise(str(raw))
        if key not in table:
            hint = next((text for word, text in (hints or {}).items() if word in key), "")
            raise _NoEquivalent(f"{raw!r} has no equivalent here{'; ' + hint if hint else ''}")
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
    "with_prior_preservation": ("with_prior_preservation", None),
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
    "tenc_weight_decay": ("text_encoder_weight_decay", None),
    "tf32_enable": ("allow_tf32", None),
    "optimizer": ("optimizer", _lookup(OPTIMIZER_NAMES, _squash, OPTIMIZER_HINTS)),
    "attention": ("attention", _lookup(ATTENTION_NAMES, str.lower)),
    "cache_latents": ("cache_latents", lambda raw: "memory" if _bool(raw) else "off"),
    "not_cache_latents": ("cache_latents", lambda raw: "off" if _bool(raw) else "memory"),
    "center_crop": ("random_crop", lambda raw: not _bool(raw)),
    "scheduler": ("sample_scheduler", _lookup(SAMPLER_NAMES, _squash)),
    "half_model": ("save_precision", lambda raw: "fp16" if _bool(raw) else "fp32"),
    "scale_lr": ("scale_lr", lambda raw: "linear" if _bool(raw) else "none"),
    "lora_unet_rank": ("lora_rank", None),
    "lora_rank": ("lora_rank", None),
    "lora_alpha": ("lora_alpha", None),
    "lora_dropout": ("lora_dropout", None),
}

# The single concept that files of November 2022 kept at the top level (before concepts_list).
TOP_LEVEL_CONCEPT_KEYS = frozenset({
    "instance_data_dir", "class_data_dir", "instance_prompt", "class_prompt", "instance_token", "class_token",
    "save_sample_prompt", "save_sample_negative_prompt", "n_save_sample", "save_guidance_scale",
    "save_infer_steps", "num_class_images", "class_negative_prompt", "class_guidance_scale", "class_infer_steps"})
# Keys read by the special handlers in _apply_special (they depend on other keys).
SPECIAL_KEYS = frozenset({"use_lora", "use_lora_extended", "lora_learning_rate", "lora_txt_learning_rate",
                          "lora_txt_rank", "stop_text_encoder", "use_8bit_adam", "save_ckpt_after",
                          "save_lora_after", "concepts_list", "concepts_path", "use_concepts",
                          "adam_weight_decay", "adamw_weight_decay", "save_embedding_every", "save_preview_every",
                          "save_ckpt_during", "save_lora_during", "save_use_epochs"}) | TOP_LEVEL_CONCEPT_KEYS

IGNORED_REASONS: dict[str, str] = {
    **{key: "the model's own name, base and architecture are kept" for key in (
        "model_name", "model_dir", "model_path", "pretrained_model_name_or_path", "src", "v2", "model_type",
        "custom_model_name", "shared_diffusers_path", "use_shared_src", "has_ema", "pretrained_vae_name_or_path",
        "initial_revision", "sd_model_checkpoint", "model_family", "prediction_type", "base_checkpoint")},
    **{key: "a training progress counter, not a setting" for key in (
        "epoch", "revision", "lifetime_revision", "lifetime_epoch", "lifetime_step", "total_steps")},
    **{key: "the old extension's bookkeeping, not a training setting" for key in (
        "output_dir", "snapshot", "graph_smoothing", "disable_logging", "save_class_txt")},
    "save_use_global_counts": "save intervals counted across all runs of the model there; here they count within "
                              "a run",
    **{key: "saving training state (optimizer, RNG) is set by snapshot_every_n_steps here" for key in (
        "save_state_after", "save_state_during", "save_state_cancel")},
    **{key: "a cancelled run's weights always stay in the model's working folder here; export them with "
       "the export command" for key in ("save_ckpt_cancel", "save_lora_cancel")},
    **{key: "the strength a LoRA is applied with at generation time: set it in the prompt, e.g. "
       "<lora:name:0.8>" for key in ("lora_weight", "lora_txt_weight")},
    **{key: "no equivalent here (a method or option of the old extension only)" for key in (
        "train_imagic", "use_dream", "dream_detail_preservation", "freeze_spectral_norm", "split_loss",
        "strict_tokens", "dynamic_img_norm", "tomesd", "train_unfrozen", "use_subdir", "disable_class_matching",
        "prior_loss_scale", "prior_loss_target", "prior_loss_weight_min", "ema_predict", "infer_ema",
        "freeze_clip_normalization", "full_mixed_precision", "epoch_pause_frequency", "epoch_pause_time",
        "lora_use_buggy_requires_grad", "save_lora_for_extra_net", "deterministic")},
    "save_safetensors": "saves are always .safetensors here",
    "gradient_set_to_none": "gradients are always cleared by setting them to None here (the faster way)",
    "use_cpu": "the device is chosen by the web UI or the standalone app",
    "input_pertubation": "it had no effect on the old extension's training; input_perturbation here is a "
                         "strength (0.1 typical)",
    "tenc_grad_clip_norm": "one gradient clip norm for all trained weights here: max_grad_norm",
    "lr_factor": "the old constant/linear schedules' start factor has no equivalent; use lr_warmup_steps for a "
                 "ramp",
    "lr_scale_pos": "the old constant/linear schedules' ramp length has no equivalent; use lr_warmup_steps",
    "learning_rate_min": "decaying schedules end at 0 here; lr_decay_past_end keeps the LR above 0",
    "sample_batch_size": "class images are generated at the batch size memory allows",
    "sanity_prompt": "add it to sample_prompts instead",
    "sanity_seed": "previews use each concept's sample_seed",
    "lora_model_name": "LoRAs are named after the model",
    "noise_scheduler": "training always uses the base model's noise schedule",
}


# --- public API --------------------------------------------------------------------------------

def import_file(path: str | Path, base: TrainingConfig | None = None, replace: bool = False) -> ImportResult:
    """Import a db_config.json, concepts list or our own config JSON, merged into `base`."""
    path = Path(path)
    if path.suffix.lower() == ".toml":  # kohya sd-scripts' dataset config
        from .kohya import import_kohya_toml

        return import_kohya_toml(path, base)
    text = io.read_text_file(path, "Import file")
    return import_text(text, str(path), path.parent.resolve(), base, replace)


def import_text(text: str, source_name: str = "pasted JSON", base_dir: str | Path | None = None,
                base: TrainingConfig | None = None, replace: bool = False) -> ImportResult:
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
    return import_data(data, source_name, Path(base_dir) if base_dir is not None else None, base, replace)


def import_data(data: Any, source: str, base_dir: Path | None = None,
                base: TrainingConfig | None = None, replace: bool = False) -> ImportResult:
    """Import already-parsed JSON of any supported kind.

    The import merges onto `base`: settings the data does not name keep their value. With `replace`,
    it starts from the defaults instead (a full replace). The identity of `base` is kept either way.
    """
    importer = _Importer(source, base_dir, _starting_config(base, replace), replace)
    if isinstance(data, list):
        if not data:
            raise ConfigError(f"{source}: the concepts list is empty; nothing was imported (the model keeps "
                              "its concepts).")
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


def merge_config(data: dict[str, Any], base: TrainingConfig, source: str, replace: bool = False) -> ImportResult:
    """Settings in our own format (any subset) merged onto `base`, as an edit does; identity kept."""
    importer = _Importer(source, None, _starting_config(base, replace), replace)
    importer.import_ours(data)
    return importer.finish(base)


def _starting_config(base: TrainingConfig | None, replace: bool) -> TrainingConfig:
    if base is None:
        return TrainingConfig()
    if not replace:
        return copy.deepcopy(base)
    fresh = TrainingConfig()
    for name in IDENTITY_FIELDS:
        setattr(fresh, name, getattr(base, name))
    return fresh


def check_identity_unchanged(current: TrainingConfig, data: dict[str, Any], source: str) -> None:
    """Refuse `data` naming an identity field with a value other than the model's (partial edits, PUT)."""
    for name in IDENTITY_FIELDS:
        if name in data and data[name] != getattr(current, name):
            raise IdentityChange(f"{source}: '{name}' is the model's identity ({getattr(current, name)!r}) and is "
                                 f"not changed by a settings edit (asked: {str(data[name])[:80]!r}); correct it "
                                 "with the explicit identity option (CLI: config --set-identity).")


def apply_identity(config: TrainingConfig, changes: dict[str, Any], source: str) -> TrainingConfig:
    """A validated copy of `config` with identity fields corrected: the one explicit path that changes them."""
    config = copy.deepcopy(config)
    for name, raw in changes.items():
        if name not in CORRECTABLE_IDENTITY:
            allowed = ", ".join(CORRECTABLE_IDENTITY)
            raise ConfigError(f"{source}: '{name}' is not an identity field; identity fields are {allowed} (a "
                              "model is renamed by renaming its folder).")
        setattr(config, name, parse_value(TrainingConfig, name, raw))
    try:
        return validate(config)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


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
CONCEPT_IGNORED_REASONS = {"is_valid": "recomputed from the folder here"}
# The old extension's concept keys that carry over under the same name.
INCUMBENT_CONCEPT_KEYS = frozenset({
    "instance_data_dir", "instance_prompt", "instance_token", "class_data_dir", "class_prompt", "class_token",
    "class_negative_prompt", "class_guidance_scale", "class_infer_steps", "num_class_images", "sample_seed"})


class _Importer:
    def __init__(self, source: str, base_dir: Path | None, config: TrainingConfig, replace: bool = False):
        self.source = source
        self.base_dir = base_dir
        self.config = config
        self.replace = replace
        self.messages: list[str] = []
        self.unset_ignored: list[str] = []
        self.concepts_from_incumbent = False
        self.file_identity: dict[str, Any] = {}

    # ---- our own format
    def import_ours(self, data: dict[str, Any]) -> None:
        data = io.migrate(data, self.source)
        for key, raw in data.items():
            if key in IDENTITY_FIELDS:
                self.file_identity[key] = raw  # put back from the base in finish(), with a message
            elif key in CONFIG_FIELDS:
                self._set_field(key, key, raw)
            elif key not in ("version", "concepts"):
                self.messages.append(f"{self.source}: unknown setting '{key}' ignored.")
        if "concepts" in data:
            concepts = io.from_dict({"version": data["version"], "concepts": data["concepts"]}, self.source,
                                    warn=self.messages.append).concepts
            for index, concept in enumerate(concepts):
                resolve_concept_paths(concept, index, self.base_dir, self.messages)
            self._replace_concepts(concepts, "concepts")

    def _replace_concepts(self, concepts: list[Concept], where: str) -> None:
        """Set the imported concepts; an empty list keeps the model's own unless this is a full replace."""
        if concepts or self.replace:
            self.config.concepts = concepts
        elif self.config.concepts:
            self.messages.append(f"{where}: the file's list of concepts is empty; kept the model's "
                                 f"{len(self.config.concepts)} concept(s)")

    # ---- incumbent db_config.json
    def import_settings(self, data: dict[str, Any]) -> None:
        data = {_undecorated(key, data): raw for key, raw in data.items()}
        for key, raw in data.items():
            if key in SETTING_MAP:
                self._set_mapped(key, raw)
            elif key in CONFIG_FIELDS and key not in IDENTITY_FIELDS and key not in SPECIAL_KEYS:
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
        if convert and isinstance(raw, str) and value != raw:
            self.messages.append(f"mapped: {key}={raw!r} -> {name}={value!r}")
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
        stop = incumbent_eras.text_encoder_stop(data, self.source)
        if stop is not None:
            fraction, message = stop
            if message:
                self.messages.append(message)
            apply_text_encoder_stop(self.config, fraction)
        if self._flag(data, "use_8bit_adam") and "optimizer" not in data:
            self.config.optimizer = "adamw_8bit"
        self._apply_weight_decay(data)
        if incumbent_eras.ramps_up(data):
            self.config.lr_scheduler = "constant_with_warmup"
            self.messages.append("mapped: lr_scheduler='linear' (a ramp up from lr_factor x LR, then constant, in "
                                 "that version) -> constant_with_warmup: set lr_warmup_steps to the ramp's length")
        self._apply_saving(data)
        self._apply_concepts(data)

    def _apply_weight_decay(self, data: dict[str, Any]) -> None:
        # 2022 and early-2023 files had one decay for the single optimizer over UNet and text encoder.
        for key in ("adam_weight_decay", "adamw_weight_decay"):
            if data.get(key) is not None:
                self._set_field(key, "weight_decay", data[key])
                if data.get("tenc_weight_decay") is None:
                    self._set_field(key, "text_encoder_weight_decay", data[key])

    def _apply_saving(self, data: dict[str, Any]) -> None:
        lora = self.config.method == "lora"
        save_after = self._flag(data, "save_lora_after" if lora else "save_ckpt_after")
        if save_after is not None:
            self.config.save_on_end = save_after
        during_key = "save_lora_during" if lora else "save_ckpt_during"
        saves_during = self._flag(data, during_key)
        if saves_during is False:
            self.config.save_every_n_steps = self.config.save_every_n_epochs = 0
        for key, name, message in incumbent_eras.save_intervals(data, saves_during, during_key):
            if name:
                self._set_field(key, name, data[key])
            if message:
                self.messages.append(message)

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
        rank_key = next((key for key in ("lora_unet_rank", "lora_rank") if data.get(key) is not None), None)
        if rank_key and data.get("lora_alpha") is None:
            # The old extension's LoRA layers had no alpha: their output was used at full strength (scale 1).
            self.config.lora_alpha = float(self.config.lora_rank)
            self.messages.append(f"mapped: {rank_key}={self.config.lora_rank} -> lora_rank={self.config.lora_rank}, "
                                 f"lora_alpha={self.config.lora_rank} (the old extension trained LoRA at scale "
                                 "1 = alpha/rank)")
        if self._flag(data, "use_lora_extended"):
            self.config.lora_conv_rank = self.config.lora_rank
            self.config.lora_conv_alpha = float(self.config.lora_rank)

    def _apply_concepts(self, data: dict[str, Any]) -> None:
        # As the old extension chose: the concepts file when use_concepts is on, else the inline list,
        # else (files of Nov 2022) the single concept kept at the top level.
        if data.get("concepts_path") and data.get("use_concepts", True) \
                and self._concepts_from_file(str(data["concepts_path"])):
            return
        if data.get("concepts_list"):
            self.set_concepts(data["concepts_list"], "concepts_list")
        elif data.get("instance_data_dir") and not _unset(Concept, "instance_data_dir", data["instance_data_dir"]):
            top = {key: data[key] for key in TOP_LEVEL_CONCEPT_KEYS if key in data}
            self.set_concepts([top], "the top-level concept")
            self.messages.append("mapped: the top-level instance_data_dir, instance_prompt, ... -> concept 1")
        elif "concepts_list" in data:
            self.set_concepts(data["concepts_list"], "concepts_list")

    def _concepts_from_file(self, raw_path: str) -> bool:
        """Import the concepts file `raw_path` names; False (with a message) when it cannot be used."""
        if self.base_dir is None:
            # Pasted text must not make the server read files it names; import that file instead.
            self.messages.append(f"ignored: concepts_path ('{raw_path}'; import that concepts list file itself)")
            return False
        path = Path(resolve_import_path(raw_path, "concepts_path", self.base_dir, self.messages))
        if not path.is_file():
            self.messages.append(f"ignored: concepts_path ({raw_path!r} not found at {path}; import the concepts "
                                 "list file itself)")
            return False
        try:
            concepts = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{self.source}: concepts_path {path} cannot be read as JSON ({error}).") from None
        self.set_concepts(concepts, str(path))
        return True

    def set_concepts(self, raw: Any, where: str) -> None:
        if not isinstance(raw, list):
            raise ConfigError(f"{self.source}: {where} must be a list of concept objects, "
                              f"found {type(raw).__name__}.")
        if len(raw) > MAX_CONCEPTS:
            raise ConfigError(f"{self.source}: {where} has {len(raw):,} concepts, more than the maximum "
                              f"{MAX_CONCEPTS}.")
        concepts = []
        for index, item in enumerate(raw):
            if not isinstance(item, dict):
                raise ConfigError(f"{self.source}: concept {index + 1} must be a JSON object with keys such as "
                                  f"instance_data_dir, found {type(item).__name__} {item!r:.40}.")
            concepts.append(self._concept(item, index))
        self._replace_concepts(concepts, where)
        self.concepts_from_incumbent = any(key in CONCEPT_ALIASES for item in raw for key in item)

    def _concept(self, data: dict[str, Any], index: int) -> Concept:
        concept = Concept()
        for key, raw in data.items():
            name = key if key in CONCEPT_FIELDS else CONCEPT_ALIASES.get(key)
            if name and not _unset(Concept, name, raw):
                self._set_concept_field(concept, index, key, name, raw)
            elif name is None:
                self._ignore(f"concepts[{index}].{key}", raw,
                             CONCEPT_IGNORED_REASONS.get(key, "no equivalent concept setting here"))
        self._concept_specials(concept, index, data)
        resolve_concept_paths(concept, index, self.base_dir, self.messages)
        # num_class_images_per replaced the total in 2023; files rewritten since keep a stale total beside it.
        if not _unset(Concept, "num_class_images", data.get("num_class_images_per")):
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
            # Keep prior preservation on with at least one image's worth until the folder can be counted.
            self.messages.append(f"concept {index + 1}: num_class_images_per={per} could not be converted to a "
                                 f"total (instance folder not readable); num_class_images set to {per}: set it to "
                                 f"{per} x the number of instance images")
        concept.num_class_images = max(per, 0) * (images if images is not None else 1)

    # ---- result
    def finish(self, base: TrainingConfig | None) -> ImportResult:
        if self.replace and base is not None and base.concepts and not self.config.concepts:
            self.messages.append(f"concepts: the file has none; the full replace removed the model's "
                                 f"{len(base.concepts)} concept(s)")
        if base is not None:
            for name in IDENTITY_FIELDS:
                setattr(self.config, name, getattr(base, name))
            self.messages.extend(_kept_identity(self.file_identity, base))
        elif self.file_identity:
            for name, raw in self.file_identity.items():
                if name in CONFIG_FIELDS:
                    self._set_field(name, name, raw)
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


def resolve_concept_paths(concept: Concept, index: int, base_dir: Path | None, messages: list[str]) -> None:
    """Resolve the concept's folders like resolve_import_path; note an instance folder missing here."""
    for name in PATH_FIELDS:
        raw = getattr(concept, name)
        if raw:
            setattr(concept, name, resolve_import_path(raw, f"concept {index + 1} {name}", base_dir, messages))
    folder = concept.instance_data_dir
    if folder and not _WINDOWS_PATH.match(folder) and not os.path.isdir(folder):
        messages.append(f"concept {index + 1}: instance_data_dir '{folder}' does not exist on this "
                        "machine; fix the path before training")


def apply_text_encoder_stop(config: TrainingConfig, stop: float | None) -> None:
    """Set an old file's stop_text_encoder fraction; the old extension expressed "don't train the text
    encoder" as stopping it at 0."""
    if stop is None:
        return
    config.train_text_encoder = stop > 0
    if stop > 0:
        config.stop_text_encoder = stop


def resolve_import_path(raw: str, where: str, base_dir: Path | None, messages: list[str]) -> str:
    """Absolute paths stay; relative ones resolve against the JSON file's folder (`base_dir`)."""
    if _WINDOWS_PATH.match(raw):
        if os.name != "nt":
            messages.append(f"{where}: '{raw}' is a Windows path, which does not exist on this machine; fix the "
                            "path to where the folder is here")
        return raw
    text = os.path.expanduser(raw)
    if os.name != "nt" and "\\" in text and not os.path.exists(text):
        text = text.replace("\\", "/")
        messages.append(f"{where}: Windows separators in '{raw}' read as '/'")
    if os.path.isabs(text):
        return os.path.normpath(text)
    if base_dir is None:
        messages.append(f"{where}: relative path '{raw}' kept as given (no file folder to resolve it against); "
                        "use an absolute path")
        return raw
    return os.path.normpath(base_dir / text)


def _kept_identity(file_identity: dict[str, Any], base: TrainingConfig) -> list[str]:
    return [f"ignored: {name} ({raw!r}; an import keeps the model's {getattr(base, name)!r}: correct it with "
            "config --set-identity)" for name, raw in file_identity.items() if raw != getattr(base, name)]


def _undecorated(key: str, data: dict[str, Any]) -> str:
    """The old extension read a UI-prefixed 'db_X' as 'X' (unless X itself is also present)."""
    if key.startswith("db_") and key[3:] not in data:
        return key[3:]
    return key


def known_incumbent_keys() -> set[str]:
    """Every key of the old extension's files that this importer gives a meaning or a reason."""
    return set(SETTING_MAP) | set(SPECIAL_KEYS) | set(IGNORED_REASONS) | set(CONCEPT_ALIASES) \
        | set(CONCEPT_IGNORED_REASONS) | INCUMBENT_CONCEPT_KEYS


def _unset(cls: type, name: str, raw: Any) -> bool:
    """None, or an empty string for a non-text field: the old files write both for 'not set'."""
    return raw is None or (raw == "" and field_type(cls, name) is not str)


def count_images(folder: str) -> int | None:
    """Images directly in `folder`, or None when it cannot be listed."""
    if not folder:
        return None
    try:
        return sum(1 for p in Path(folder).iterdir() if is_image_name(p.name.lower()))
    except OSError:
        return None
