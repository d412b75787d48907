"""The LoRA tools as jobs on the host's folders: sources are resolved, loaded, processed, written atomically.

Names are resolved inside the host's folders (`restrict=True`, for the tab and the API) or, from the
command line, also as plain paths. A trained source is `model:NAME` (our model's working weights), a
checkpoint file or a diffusers folder; LoRAs come from the LoRA folder. Outputs never replace a file:
`unused_path` adds _2, _3, ...
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError
from ..store import Layout, ModelStore, check_model_name, unused_path
from .extract import RankRule, extract_lora
from .file_merge import merge_into_file, merges_in_file
from .files import save_lora
from .merge import merge_into_components, merge_loras
from .read import LoraFile, components_key_table, guess_family, load_lora
from .report import RetainedReport
from .resize import resize_lora

MODEL_PREFIX = "model:"
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class ToolResult:
    path: Path
    message: str
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "message": self.message, "report": self.report}


# --- resolving names ------------------------------------------------------------------------------------

def _inside(folder: Path, name: str, what: str, restrict: bool) -> Path:
    raw = Path(str(name).strip()).expanduser()
    candidates = [folder / raw] + ([raw] if not restrict else [])
    for candidate in candidates:
        resolved = candidate.resolve()
        if restrict and not resolved.is_relative_to(folder.resolve()):
            raise ConfigError(f"{what} {name!r} is not inside {folder}; pick one from the list.")
        if resolved.exists():
            return resolved
    raise ConfigError(f"{what} {name!r} not found in {folder}; press Refresh and pick one from the list.")


def checkpoint_path(layout: Layout, name: str, restrict: bool = True) -> Path:
    if not name:
        raise ConfigError("No checkpoint chosen; pick one from the checkpoint list.")
    return _inside(layout.checkpoints_dir, name, "Checkpoint", restrict)


def lora_path(layout: Layout, name: str, restrict: bool = True) -> Path:
    if not name:
        raise ConfigError("No LoRA chosen; pick one from the LoRA list.")
    return _inside(layout.lora_dir, name, "LoRA", restrict)


def output_stem(name: str | None, default: str) -> str:
    stem = Path(name).stem if name else default
    return check_model_name(stem)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"Precision {precision!r} is unknown; use {', '.join(PRECISIONS)}.")
    return precision


def load_trained(layout: Layout, source: str, restrict: bool = True) -> tuple[Any, str | None]:
    """Components of `model:NAME` or a checkpoint/diffusers folder, and (for our models) the base it came from."""
    from ..models.components import load_components
    from ..models.loading import load_source

    if source.startswith(MODEL_PREFIX):
        model = ModelStore(layout).existing(source[len(MODEL_PREFIX):].strip())
        if not model.working.is_dir():
            raise ConfigError(f"Model {model.name!r} has no weights in {model.working}; create it again.")
        return load_components(model.working), model.load_config().base_checkpoint or None
    return load_source(checkpoint_path(layout, source, restrict)), None


# --- jobs -------------------------------------------------------------------------------------------------

def _model_base(layout: Layout, recorded: str | None) -> Path:
    from ..train.data.class_images import base_checkpoint_path

    found = base_checkpoint_path(recorded or "", layout.checkpoints_dir)
    if found is None:
        raise ConfigError("No base checkpoint given, and the model's own base is not in the checkpoints folder; "
                          "choose the checkpoint the model was trained from.")
    return found


def _result(path: Path, what: str, report: RetainedReport | None) -> ToolResult:
    text = f"{what}: {path}" + (f"\n{report.text()}" if report is not None else "")
    return ToolResult(path, text, report.to_dict() if report is not None else {})


def extract(layout: Layout, trained: str, base: str | None, rule: RankRule, conv_rule: RankRule | None = None,
            out_name: str | None = None, precision: str = "fp32", restrict: bool = True) -> ToolResult:
    """Extract trained - base as a LoRA into the LoRA folder; `base` defaults to a model's base checkpoint."""
    from ..models.loading import load_source

    check_precision(precision)
    components, model_base = load_trained(layout, trained, restrict)
    base_path = checkpoint_path(layout, base, restrict) if base else _model_base(layout, model_base)
    lora, report = extract_lora(components, load_source(base_path), rule, conv_rule)
    default = f"{Path(trained.removeprefix(MODEL_PREFIX)).stem}-extracted"
    target = unused_path(layout.lora_dir, output_stem(out_name, default))
    metadata = {"dreambooth_tool": "extract", "dreambooth_extracted_from": Path(trained).name,
                "ss_sd_model_name": base_path.name, "dreambooth_retained": f"{report.total_fraction:.6f}",
                "ss_training_comment": f"extracted from {Path(trained).name} minus {base_path.name}"}
    save_lora(lora, target, components.family, metadata, precision)
    return _result(target, "Extracted LoRA", report)


def _read_family(loras: Sequence[LoraFile], family: str | None) -> str:
    """The family for the output metadata: given, recorded by us, or guessed from the first LoRA."""
    if family:
        return family
    for lora in loras:
        known = lora.metadata.get("dreambooth_family") or guess_family({k: None for k in lora.modules},
                                                                        lora.metadata)
        if known:
            return known
    return "sdxl" if any(key.startswith("lora_te2_") for lora in loras for key in lora.modules) else "sd1"


def resize(layout: Layout, lora_name: str, rule: RankRule, out_name: str | None = None,
           family: str | None = None, precision: str = "fp32", restrict: bool = True) -> ToolResult:
    path = lora_path(layout, lora_name, restrict)
    source = load_lora(path, family=family)
    resized, report = resize_lora(source, rule)
    target = unused_path(layout.lora_dir, output_stem(out_name, f"{path.stem}-resized"))
    metadata = {"dreambooth_tool": "resize", "dreambooth_resized_from": path.name,
                "dreambooth_retained": f"{report.total_fraction:.6f}",
                **{key: source.metadata[key] for key in ("ss_sd_model_name", "ss_tag_frequency") if key in source.metadata}}
    save_lora(resized, target, _read_family([source], family), metadata, precision)
    return _result(target, "Resized LoRA", report)


def _weighted(layout: Layout, loras: Sequence[tuple[str, float]], restrict: bool, table: Any = None,
              family: str | None = None) -> list[tuple[LoraFile, float]]:
    if not loras:
        raise ConfigError("No LoRA chosen; pick at least one LoRA and its weight.")
    return [(load_lora(lora_path(layout, name, restrict), table, family), float(weight)) for name, weight in loras]


def _merge_metadata(source: Path, weighted: Sequence[tuple[LoraFile, float]]) -> dict[str, Any]:
    return {"dreambooth_tool": "merge", "dreambooth_base": source.name,
            "dreambooth_merged_loras": [{"name": lora.name, "weight": weight} for lora, weight in weighted]}


def _merged_names(weighted: Sequence[tuple[LoraFile, float]]) -> str:
    return ", ".join(f"{lora.name} x {weight:g}" for lora, weight in weighted)


def merge_to_checkpoint(layout: Layout, checkpoint: str, loras: Sequence[tuple[str, float]],
                        out_name: str | None = None, precision: str = "fp16", restrict: bool = True) -> ToolResult:
    """Merge the LoRAs at their weights into a checkpoint, exported in the host's single-file format (SD3 and
    Flux: the checkpoint's own file, merged tensor by tensor: see file_merge)."""
    from ..models.export import PRECISIONS as DTYPES
    from ..models.export import export_checkpoint
    from ..models.loading import file_precision, load_source

    check_precision(precision)
    source = checkpoint_path(layout, checkpoint, restrict)
    if merges_in_file(source, [lora_path(layout, name, restrict) for name, _ in loras]):
        return _merge_in_file(layout, source, loras, out_name, precision, restrict)
    # A file already in the output's half precision merges in it: each changed weight is still added in fp32 and
    # rounded once, so the result is the same as through fp32, in half the memory (SDXL: 7 GiB, not 14)
    same = file_precision(source) == DTYPES[precision]
    components = load_source(source, dtype=None if same else DTYPES["fp32"])
    table = components_key_table(components)
    weighted = _weighted(layout, loras, restrict, table)
    changed = merge_into_components(components, weighted, table)
    target = unused_path(layout.checkpoints_dir, output_stem(out_name, f"{source.stem}-merged"))
    metadata = {**_source_configs(source), **_merge_metadata(source, weighted)}
    export_checkpoint(components, target, precision, metadata=metadata)
    return ToolResult(target, f"Merged {_merged_names(weighted)} into {source.name} ({changed} layers changed): {target}")


def _merge_in_file(layout: Layout, source: Path, loras: Sequence[tuple[str, float]], out_name: str | None,
                   precision: str, restrict: bool) -> ToolResult:
    """SD3 / Flux: the LoRAs (kohya spelling) merged into the checkpoint's own file, every other tensor copied."""
    if source.suffix.lower() != ".safetensors":
        raise ModelError(f"Checkpoint {source.name}: SD3 and Flux LoRAs merge into .safetensors files only; "
                         "choose the .safetensors version of the checkpoint.")
    weighted = _weighted(layout, loras, restrict)
    target = unused_path(layout.checkpoints_dir, output_stem(out_name, f"{source.stem}-merged"))
    metadata = {key: value if isinstance(value, str) else json.dumps(value)
                for key, value in _merge_metadata(source, weighted).items()}
    changed = merge_into_file(source, weighted, target, precision, metadata)
    return ToolResult(target, f"Merged {_merged_names(weighted)} into {source.name} ({changed} weights changed, "
                              f"floating tensors saved in {precision}, the file's layout kept): {target}")


def _source_configs(source: Path) -> dict[str, str]:
    """A demo checkpoint's embedded configs travel on, so the merged file loads as the same architecture."""
    from ..models.loading import CONFIGS_METADATA_KEY

    if source.suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return {CONFIGS_METADATA_KEY: metadata[CONFIGS_METADATA_KEY]} if CONFIGS_METADATA_KEY in metadata else {}


def merge_to_lora(layout: Layout, loras: Sequence[tuple[str, float]], rule: RankRule | None = None,
                  out_name: str | None = None, family: str | None = None, precision: str = "fp32",
                  restrict: bool = True) -> ToolResult:
    """One LoRA from several: concatenated ranks (rule None, exact) or re-factored to the rule's rank."""
    weighted = _weighted(layout, loras, restrict, family=family)
    merged, report = merge_loras(weighted, rule)
    stem = "-".join(Path(lora.name).stem for lora, _ in weighted)[:80] + "-merged"
    target = unused_path(layout.lora_dir, output_stem(out_name, stem))
    metadata = {"dreambooth_tool": "merge",
                "dreambooth_merged_loras": [{"name": lora.name, "weight": weight} for lora, weight in weighted]}
    save_lora(merged, target, _read_family([lora for lora, _ in weighted], family), metadata, precision)
    if report is None:
        ranks = [module.rank for module in merged.modules.values()]
        return ToolResult(target, f"Merged LoRA (concatenated, rank up to {max(ranks)}; exact): {target}")
    return _result(target, "Merged LoRA", report)


def rule_from(mode: str | None, value: float | None, max_rank: int | None = None) -> RankRule:
    """A RankRule from the tab's or the API's fields (mode fixed/ratio/energy, its value, the dynamic cap)."""
    mode = mode or "fixed"
    if value is None:
        raise ConfigError(f"Rank mode {mode!r} needs a value (a rank, a ratio or a fraction).")
    try:
        return RankRule(mode, float(value), int(max_rank or 128)).check("rank")
    except (TypeError, ValueError):
        raise ConfigError(f"Rank value {value!r} or max rank {max_rank!r} is not a number.") from None
    except ModelError as error:
        raise ConfigError(str(error)) from None


def conv_rule_for(rule: RankRule, conv_rank: int) -> RankRule | None:
    """The LoCon rule: none for conv rank 0; fixed conv rank; or the dynamic rule capped at the conv rank."""
    if conv_rank <= 0:
        return None
    if rule.mode == "fixed":
        return RankRule("fixed", conv_rank)
    return RankRule(rule.mode, rule.value, min(rule.max_rank, conv_rank))


def parse_weighted(items: Sequence[str]) -> list[tuple[str, float]]:
    """'name.safetensors:0.7' (weight 1 when left out) -> (name, weight)."""
    parsed = []
    for item in items:
        name, sep, weight = item.rpartition(":")
        if not sep or not _is_number(weight):
            name, weight = item, "1"
        parsed.append((name.strip(), float(weight)))
    if not parsed:
        raise ModelError("No LoRA given; name at least one (NAME or NAME:WEIGHT).")
    return parsed


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
