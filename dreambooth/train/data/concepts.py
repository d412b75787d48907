"""Effective concepts: kohya-style `N_identifier class` folders expanded, class folders resolved.

Rules (documented for users):
- if a concept's instance folder holds subfolders named `N_identifier class` (e.g. `10_sks dog`),
  each becomes a concept with N repeats, instance token `sks`, class token `dog` and an empty
  instance prompt (so its prompt is "sks dog", or each image's caption with the token inserted).
  Loose images beside those subfolders stay a concept of their own. Other subfolders are not read
  (they are listed as skipped).
- a concept pointed at such a folder itself takes the repeats and tokens of its name where its own settings
  are unset (repeats 1, empty tokens); a note says what was taken and what was kept.
- a kohya concept's class images: the parent's class folder, or its `N_<class token>` subfolder
  when it has one (kohya's regularisation layout).
- a concept without a class folder uses `<model>/classifiers/<prompt slug>-<prompt hash>/`, so
  concepts with the same class prompt share (and reuse) generated images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from ...config.schema import Concept, TrainingConfig, uses_prior_preservation
from ...imagefiles import is_image_name
from .captions import class_caption

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


def prior_active(config: TrainingConfig) -> bool:
    return uses_prior_preservation(config)


def folder_of(text: str) -> Path:
    return Path(text).expanduser()


def kohya_parts(name: str) -> tuple[int, str, str] | None:
    """(repeats, instance token, class token) of a `N_identifier class` folder name, else None."""
    match = KOHYA_FOLDER.match(name)
    if not match:
        return None
    words = match.group(2).split(maxsplit=1)
    if not words:
        return None
    return int(match.group(1)), words[0], words[1] if len(words) > 1 else ""


def expand_concepts(config: TrainingConfig) -> tuple[list[Concept], list[tuple[Path, str]]]:
    """The effective concepts and the subfolders that are not read, with the reason."""
    concepts, skipped, _ = expand_concepts_noted(config)
    return concepts, skipped


def expand_concepts_noted(config: TrainingConfig) -> tuple[list[Concept], list[tuple[Path, str]], list[str]]:
    """`expand_concepts`, plus notes on what a folder's kohya-style name changed."""
    concepts: list[Concept] = []
    skipped: list[tuple[Path, str]] = []
    notes: list[str] = []
    for number, concept in enumerate(config.concepts, start=1):
        folder = folder_of(concept.instance_data_dir) if concept.instance_data_dir.strip() else None
        if folder is None or not folder.is_dir():
            concepts.append(concept)
            continue
        own = kohya_parts(folder.name)
        if own and own[0] >= 1:  # pointed at a `10_sks dog` folder itself: its name says how to train it
            concept, note = _named_by_folder(concept, folder, *own)
            notes.append(f"Concept {number}: {note}")
        try:
            subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:  # unreadable: the scan reports it for this concept
            concepts.append(concept)
            continue
        kohya = [(p, kohya_parts(p.name)) for p in subfolders if kohya_parts(p.name)]
        if not kohya or _has_images(folder):
            concepts.append(concept)
        for path, parts in kohya:
            if parts[0] < 1:
                skipped.append((path, f"folder '{path.name}' has repeat count 0; rename it like "
                                f"'10_{path.name.split('_', 1)[1]}' to train it"))
                continue
            concepts.append(_kohya_concept(concept, path, *parts))
        skipped.extend(_unread_folders(subfolders, {p for p, _ in kohya}))
    return concepts, skipped, notes


def _named_by_folder(concept: Concept, folder: Path, repeats: int, token: str, class_token: str
                     ) -> tuple[Concept, str]:
    """The concept with the repeats and tokens of its folder's kohya name where its own settings are unset
    (repeats 1, empty tokens), and a note saying what was taken and what was kept."""
    taken, kept = [], []
    changes: dict[str, object] = {}
    for name, from_folder, unset in (("repeats", repeats, 1), ("instance_token", token, ""),
                                     ("class_token", class_token, "")):
        current = getattr(concept, name)
        if from_folder in (unset, current):
            continue
        if current == unset:
            changes[name] = from_folder
            taken.append(f"{name} {from_folder!r}")
        else:
            kept.append(f"{name} {current!r} (the name says {from_folder!r})")
    note = f"folder '{folder.name}' is named in kohya's '<repeats>_<token> <class>' style"
    if taken:
        note += f"; from its name it trains with {', '.join(taken)}"
    if kept:
        note += f"; the concept's own {', '.join(kept)} are kept"
    if not taken and not kept:
        note += "; the concept's settings already match it"
    return dataclasses.replace(concept, **changes), note + "."


def concept_labels(config: TrainingConfig, concepts: list[Concept]) -> list[str]:
    """How messages name each effective concept: 'Concept N' as the user configured it, with the kohya
    subfolder when the concept was expanded from one ('Concept 1, folder 3_ohwx')."""
    labels = []
    for index, concept in enumerate(concepts):
        labels.append(_label(config, concept) or f"Concept {index + 1}")
    return labels


def _label(config: TrainingConfig, concept: Concept) -> str | None:
    folder = concept.instance_data_dir
    for number, configured in enumerate(config.concepts, start=1):
        if configured.instance_data_dir == folder:
            return f"Concept {number}"
    for number, configured in enumerate(config.concepts, start=1):
        if configured.instance_data_dir.strip() and folder_of(folder).parent == folder_of(configured.instance_data_dir):
            return f"Concept {number}, folder '{folder_of(folder).name}'"
    return None


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and is_image_name(p) for p in folder.iterdir())


def _unread_folders(subfolders: list[Path], kohya: set[Path]) -> list[tuple[Path, str]]:
    return [(p, f"subfolder '{p.name}' is not read: only images and kohya-style 'N_identifier class' folders "
                "are; move its images up or rename it like '10_sks dog'") for p in subfolders if p not in kohya]


def _kohya_concept(parent: Concept, folder: Path, repeats: int, token: str, class_token: str) -> Concept:
    same_class = parent.class_token.strip().lower() == class_token.lower()
    return dataclasses.replace(
        parent, instance_data_dir=str(folder), repeats=repeats, instance_token=token, class_token=class_token,
        instance_prompt="", class_prompt=parent.class_prompt if same_class else "",
        class_data_dir=_kohya_class_dir(parent.class_data_dir, class_token), sample_prompt="")


def _kohya_class_dir(parent_dir: str, class_token: str) -> str:
    if not parent_dir.strip() or not class_token:
        return parent_dir
    folder = folder_of(parent_dir)
    if not folder.is_dir():
        return parent_dir
    for sub in sorted(folder.iterdir()):
        parts = kohya_parts(sub.name)
        if sub.is_dir() and parts and " ".join(parts[1:]).strip().lower() == class_token.lower():
            return str(sub)
    return parent_dir


def class_prompt_of(concept: Concept) -> str:
    return class_caption(concept, None)


def class_folder(concept: Concept, class_root: Path | None) -> Path | None:
    """Where the concept's class images live (None: no folder and no model class root)."""
    if concept.class_data_dir.strip():
        return folder_of(concept.class_data_dir)
    if class_root is None:
        return None
    return class_root / prompt_folder_name(class_prompt_of(concept))


def prompt_folder_name(prompt: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:40] or "class"
    return f"{slug}-{prompt_hash(prompt)}"


def prompt_hash(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:10]
