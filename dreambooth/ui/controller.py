"""What the tab's buttons do, without gradio: plain values in, plain values out.

The tab (tab.py) only wires components to these methods; tests drive them directly with a fake host.
Every user-fixable problem raises a DreamboothError whose message the tab shows as it is.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from ..config.schema import TrainingConfig
from ..errors import ConfigError
from ..host.base import Host
from ..imagefiles import is_image_name
from ..store import ModelStore
from ..textfiles import read_text
from . import forms

log = logging.getLogger(__name__)

AUTO = "auto"
# Memory choices of the presets panel -> GB (None: CPU).
MEMORY_CHOICES: dict[str, float | None] = {"CPU": None, "6 GB": 6, "8 GB": 8, "12 GB": 12, "16 GB": 16,
                                           "24 GB": 24, "48+ GB": 48}
PREVIEW_IMAGES = 8


def load_images(paths: list[str], captions: list[str] | None = None) -> list[tuple[Image.Image, str]]:
    """(image, caption) pairs for a gallery; files that vanished or are unreadable are left out."""
    captions = captions or []
    items = []
    for index, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                picture = image.convert("RGB")
        except OSError as error:
            log.debug("Skipping unreadable image %s: %s", path, error)
            continue
        items.append((picture, captions[index] if index < len(captions) else Path(path).name))
    return items


class TabController:
    """The tab's actions over one host, training service and model store."""

    def __init__(self, host: Host, service: Any, store: ModelStore):
        self.host = host
        self.service = service
        self.store = store

    # --- models -------------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return self.store.names()

    def checkpoint_choices(self) -> dict[str, Path]:
        """Dropdown label (path relative to the checkpoints folder) -> checkpoint file."""
        refresh = getattr(self.host, "refresh_checkpoints", None)
        if refresh is not None:
            refresh()
        root = self.host.layout.checkpoints_dir
        choices = {}
        for path in self.host.list_checkpoints():
            path = Path(path)
            try:
                label = str(path.relative_to(root))
            except ValueError:
                label = str(path)
            choices[label] = path
        return choices

    def load_config(self, name: str | None) -> TrainingConfig:
        if not name:
            return TrainingConfig()
        return self.store.existing(name).load_config()

    def save_config(self, name: str | None, values: list[Any]) -> TrainingConfig:
        if not name:
            raise ConfigError("No model selected: create one under Model, or pick one in the model list.")
        config = forms.form_to_config(values)
        self.store.existing(name).save_config(config)
        return config

    def create_model(self, name: str, source_label: str, family: str, prediction: str) -> str:
        if not source_label:
            raise ConfigError("Choose the checkpoint to create the model from (press Refresh if the list is empty).")
        source = self.checkpoint_choices().get(source_label, Path(source_label))
        self.service.create_model(name.strip(), source, family=None if family == AUTO else family,
                                  prediction_type=None if prediction == AUTO else prediction)
        return name.strip()

    def delete_model(self, name: str | None) -> None:
        if not name:
            raise ConfigError("No model selected to delete.")
        self._refuse_while_active(name, "delete")
        self.store.delete(name)

    def _refuse_while_active(self, name: str, action: str) -> None:
        status = self.service.status()
        if getattr(status, "active", False) and getattr(status, "model", "") == name:
            raise ConfigError(f"Model {name!r} is training; cancel the run before you {action} it.")

    # --- concepts -----------------------------------------------------------------------------------
    def import_concepts(self, text: str | None, path: Path | None) -> tuple[list[Any], list[str]]:
        """Concepts from an uploaded file (preferred) or pasted JSON; returns (concepts, warnings).

        A .toml upload is read as kohya's dataset config (its subsets become concepts)."""
        if path is not None and Path(path).suffix.lower() == ".toml":
            from ..config.kohya import import_kohya_toml

            result = import_kohya_toml(Path(path))
            return result.config.concepts, result.messages
        if path is not None:
            try:
                text = read_text(path)
            except (OSError, UnicodeDecodeError) as error:
                raise ConfigError(f"Concepts file {Path(path).name} cannot be read ({error}).") from None
            source = f"concepts file {Path(path).name}"
        else:
            source = "pasted concepts"
        if not text or not text.strip():
            raise ConfigError("Paste a concepts JSON list or upload a .json file first.")
        from ..config.legacy import import_text

        # The same importer as the CLI and the API, so old concepts_list.json keys map the same way;
        # an upload's folder is a temporary one, so relative paths are reported, not resolved there.
        result = import_text(text, source)
        if not result.config.concepts:
            raise ConfigError(f"{source}: no concepts found; nothing was imported. Paste a list of concept "
                              'objects, e.g. [{"instance_data_dir": "/data/dog", "instance_prompt": "photo of sks '
                              'dog"}].')
        return result.config.concepts, result.messages

    def preview_concept(self, name: str | None, values: list[Any], index: int) -> tuple[list[Any], str]:
        """(gallery items, Markdown summary) of the concept in panel `index`, as the trainer would read it."""
        config = forms.form_to_config(values)
        concept = config.concepts[concept_position(values, index)]
        config.concepts = [concept]  # a folder of subfolders expands to several rows: show them all
        from ..train.data.preview import dataset_preview as preview

        class_root = self.store.model(name).class_images if name else None
        rows = preview(config, class_root)
        return load_images(image_files(concept.instance_data_dir)), "\n\n".join(preview_markdown(r) for r in rows)

    # --- training -----------------------------------------------------------------------------------
    def train(self, name: str | None, values: list[Any]) -> str:
        """Save the form as the model's config, then start the run (the service refuses a second one)."""
        self.save_config(name, values)
        self.service.start(name)
        return f"Training {name} started."

    def cancel(self, save: bool) -> str:
        status = self.service.cancel(save)
        return getattr(status, "message", "") or "No run to cancel."

    def generate_class_images(self, name: str | None, values: list[Any]) -> str:
        self.save_config(name, values)
        made = self.service.generate_class_images(name)
        return f"Generated {made} class images." if made else "All class images were already there."

    def export(self, name: str | None, kind: str, precision: str | None) -> str:
        if not name:
            raise ConfigError("No model selected to export.")
        method = self.service.export_lora if kind == "lora" else self.service.export
        return f"Exported {kind}: {method(name, precision)}"

    # --- guidance -----------------------------------------------------------------------------------
    def wizard_plan(self, images_text: str, te: bool, mode: str, strength: str, lr: float | None, batch: Any,
                    accumulation: Any, resolution: Any, base_resolution: Any, scheduler: str,
                    family: str | None = None, reference_spf: float | None = None) -> Any:
        """The wizard's plan; resolution and base resolution 0 (or empty) mean the family's native one, an empty
        reference SPF the parameter study's (SD 1.5's)."""
        wizard = importlib.import_module("dreambooth.guide.wizard")
        counts = parse_counts(images_text)
        use_lr = mode == "learning rate"
        inp = wizard.WizardInput(images=counts, te=bool(te), lr=float(lr) if use_lr and lr else None,
                                 strength=None if use_lr else strength, batch=int(batch or 1),
                                 accumulation=int(accumulation or 1), resolution=int(resolution or 0),
                                 base_resolution=int(base_resolution or 0), scheduler=scheduler,
                                 family=family or "sd1",
                                 reference_spf=float(reference_spf or wizard.SPF_WITHOUT_TE))
        return wizard.plan(inp)

    def wizard_apply(self, result: Any, values: list[Any]) -> TrainingConfig:
        wizard = importlib.import_module("dreambooth.guide.wizard")
        return wizard.apply(result, forms.form_to_config(values))

    def apply_preset(self, memory: str, values: list[Any]) -> tuple[TrainingConfig, list[str]]:
        presets = importlib.import_module("dreambooth.guide.presets")
        config = forms.form_to_config(values)
        gb = MEMORY_CHOICES.get(memory)
        preset = presets.preset_for(config.model_family, gb)
        notes = presets.preset_notes(config.model_family, gb) if hasattr(presets, "preset_notes") else []
        return presets.apply_preset(config, preset), notes

    def memory_estimate(self, memory: str, values: list[Any]) -> str:
        memory_module = importlib.import_module("dreambooth.guide.memory")
        config = forms.form_to_config(values)
        working = self.store.model(config.model_name).working if config.model_name in self.store.names() else None
        estimate = memory_module.estimate_memory(config, config.model_family, memory_module.model_params(working))
        text = "\n".join(estimate.lines())
        gb = MEMORY_CHOICES.get(memory)
        warning = memory_module.warn_if_exceeds(estimate, int(gb * 2**30) if gb else None)
        return text + (f"\n\n{warning}" if warning else "")


def concept_position(values: list[Any], panel: int) -> int:
    """Index in config.concepts of the concept shown in `panel` (blank panels are not concepts)."""
    offset = len(forms.config_specs()) + 1
    panels = forms.panel_concepts(values[offset - 1], values[offset:])
    if panel >= len(panels) or panels[panel] is None:
        raise ConfigError(f"Concept {panel + 1} has no instance images folder or prompt yet; fill it in first.")
    return sum(1 for concept in panels[:panel] if concept is not None)


def parse_counts(text: str) -> list[int]:
    """'10' or '10, 5' -> image counts per concept."""
    parts = [part.strip() for part in str(text or "").replace(";", ",").split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ConfigError("Wizard: 'Images per concept' must be whole numbers above 0, e.g. '12' or '12, 8'.")
    return [int(part) for part in parts]


def image_files(folder: str, limit: int = PREVIEW_IMAGES) -> list[str]:
    """The first `limit` images of a folder, by name, for the preview gallery."""
    root = Path(folder).expanduser()
    if not folder.strip() or not root.is_dir():
        return []
    found = sorted(p for p in root.rglob("*") if is_image_name(p))
    return [str(p) for p in found[:limit]]


def preview_markdown(row: dict[str, Any]) -> str:
    """One dataset_preview row as Markdown: images and captions found, buckets, class images, problems."""
    if row.get("error") and row.get("index", 0) == -1:
        return f"**Error:** {row['error']}"
    where = row.get("instance_dir") or "(no folder)"
    lines = [f"**{where}**",
             f"- {row.get('images', 0)} images ({row.get('validation_images', 0)} held out for validation), "
             f"{row.get('captions', 0)} with captions, {row.get('masks', 0)} with masks, "
             f"repeats {row.get('repeats', 1)}"]
    for caption in row.get("example_captions", [])[:3]:
        lines.append(f"- caption: `{caption}`")
    for resolution, counts in (row.get("buckets") or {}).items():
        lines.append(f"- buckets at {resolution}px: " + (", ".join(f"{size} x{n}" for size, n in counts.items())
                                                         or "none"))
    if row.get("class_dir") or row.get("class_images") or row.get("class_missing"):
        lines.append(f"- class images: {row.get('class_images', 0)} present, {row.get('class_missing', 0)} "
                     f"missing (made before training, or press 'Generate class images') in `{row.get('class_dir')}`")
    lines += [f"- skipped `{path}`: {reason}" for path, reason in (row.get("skipped") or [])[:10]]
    lines += [f"- ⚠ {warning}" for warning in row.get("warnings") or []]
    if row.get("error"):
        lines.append(f"- **Error:** {row['error']}")
    return "\n".join(lines)
