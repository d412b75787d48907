"""What the old DreamBooth extension's fields meant in each era of its db_config.json.

Some fields changed meaning without changing name. Facts from that extension's history:
- Until mid-December 2022 `save_embedding_every` and `save_preview_every` counted optimizer steps
  (files of that time carry `not_cache_latents`; December files add `save_use_epochs`, true meaning
  epochs); from late December 2022 on they count epochs.
- From late December 2022 to mid-January 2023 `stop_text_encoder` was a number of epochs (-1: the whole
  run, 0: never); from mid-January 2023 on it is the fraction of the run. Files of the fraction era carry
  the optimizer's weight decay (`adamw_weight_decay`, later `weight_decay`/`tenc_weight_decay`) or
  `optimizer`; the epoch-era files carry none of these.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

# Keys only files of the fraction era of stop_text_encoder carry.
FRACTION_ERA_KEYS = ("adamw_weight_decay", "weight_decay", "tenc_weight_decay", "optimizer", "lora_unet_rank")


def counts_steps(data: dict[str, Any]) -> bool:
    """Whether the file's save/preview intervals count optimizer steps (files before late December 2022)."""
    if "save_use_epochs" in data:
        return not bool(data["save_use_epochs"])
    return "not_cache_latents" in data


def ramps_up(data: dict[str, Any]) -> bool:
    """Whether the file's 'linear' schedule is the one that ramped the LR *up* from lr_factor x LR over
    lr_scale_pos of the run and then held it (versions whose files carry lr_factor), not a linear decay."""
    return str(data.get("lr_scheduler", "")).lower() == "linear" and "lr_factor" in data


def _number(raw: Any, key: str, source: str) -> float:
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: '{key}': {str(raw)[:40]!r} is not a number.") from None


def text_encoder_stop(data: dict[str, Any], source: str) -> tuple[float | None, str] | None:
    """(fraction of the run, message) for `stop_text_encoder`, or None when the file does not set it.

    The fraction is None when the value cannot be converted (the message then says what to set).
    """
    raw = data.get("stop_text_encoder")
    if raw is None or raw == "":
        return None
    value = _number(raw, "stop_text_encoder", source)
    in_epochs = value == -1 or value > 1 or not any(key in data for key in FRACTION_ERA_KEYS)
    if value == -1:
        return 1.0, "mapped: stop_text_encoder=-1 (the whole run) -> stop_text_encoder=1.0"
    if value < 0:
        raise ConfigError(f"{source}: 'stop_text_encoder': {raw!r} is neither -1 (the whole run) nor an epoch "
                          "count or fraction of the run.")
    if not in_epochs or value == 0:
        return value, ""
    return _epochs_to_fraction(value, data.get("num_train_epochs"))


def _epochs_to_fraction(epochs: float, total: Any) -> tuple[float | None, str]:
    if isinstance(total, (int, float)) and not isinstance(total, bool) and total > 0:
        fraction = min(epochs / total, 1.0)
        return fraction, (f"mapped: stop_text_encoder={epochs:g} (epochs in files of this age) -> "
                          f"stop_text_encoder={fraction:g} ({epochs:g} of {total:g} epochs)")
    return None, (f"ignored: stop_text_encoder ({epochs:g} is a number of epochs in files of this age and the "
                  "file has no num_train_epochs to convert it; set stop_text_encoder, the fraction of the run "
                  "after which the text encoder stops, by hand)")


def save_intervals(data: dict[str, Any], saves_during: bool | None,
                   during_key: str) -> list[tuple[str, str | None, str]]:
    """(incumbent key, our field or None, message) for the save and preview intervals."""
    steps = counts_steps(data)
    unit = "steps" if steps else "epochs"
    result: list[tuple[str, str | None, str]] = []
    every = data.get("save_embedding_every")
    if every not in (None, ""):
        if saves_during is False:
            result.append(("save_embedding_every", None, f"ignored: save_embedding_every ({during_key} is false: "
                                                         "no saves during training)"))
        else:
            result.append(("save_embedding_every", f"save_every_n_{unit}",
                           f"mapped: save_embedding_every={every} ({unit} in files of this age) -> "
                           f"save_every_n_{unit}"))
    preview = data.get("save_preview_every")
    if preview not in (None, "", 0):
        if steps:
            result.append(("save_preview_every", "sample_every_n_steps", ""))
        else:
            result.append(("save_preview_every", None, f"ignored: save_preview_every ({preview} epochs; previews "
                                                       "here are every N steps: set sample_every_n_steps)"))
    return result
