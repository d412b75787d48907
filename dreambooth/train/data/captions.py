"""Captions: sidecar files, [filewords], token insertion, tag shuffling and caption dropout.

Rules (documented for users):
- an image's caption is `<image stem><caption extension>` beside it; if that is missing the other of
  .txt/.caption is tried. Lines are joined with ", "; files that are not UTF-8 are read as Latin-1
  with a warning.
- the instance prompt is the template; `[filewords]` in it is replaced by the caption. An empty
  instance prompt means "[filewords]" when the image has a caption, else "<instance token> <class
  token>" (kohya's folder-name prompt).
- token insertion: when a caption is used and neither it nor the rest of the prompt contains the
  instance token (as a whole word, any case), the token is inserted right before the first
  occurrence of the class token ("a dog on grass" -> "a sks dog on grass"); if the class token is
  absent too, "<instance token> <class token>, " is put in front. Putting it first keeps it in place
  under tag shuffling with "Keep first tags" >= 1. Class images do the same with the class token.
- an image whose final caption is empty trains unconditionally (a warning says so).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...config.schema import Concept, TrainingConfig
from ...textfiles import decode_text

if TYPE_CHECKING:
    from .batching import BatchItem

FILEWORDS = "[filewords]"
CAPTION_EXTENSIONS = (".txt", ".caption")
# A lower bound of CLIP's token count: words, digits (CLIP splits each) and punctuation marks.
_TOKEN_PATTERN = re.compile(r"[^\W\d_]+|\d|[^\w\s]", re.UNICODE)


def caption_path(image: Path, extension: str) -> Path | None:
    """The sidecar caption of `image`: the configured extension first, then the other one."""
    order = [extension] + [e for e in CAPTION_EXTENSIONS if e != extension]
    for ext in order:
        candidate = image.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def read_caption(path: Path) -> tuple[str, str | None]:
    """(caption text, warning or None). Lines are joined with ', '."""
    data = path.read_bytes()
    warning = None
    try:
        text = decode_text(data)
    except UnicodeDecodeError:
        text = data.decode("latin-1")
        warning = f"Caption {path} is not UTF-8; read it as Latin-1. Re-save it as UTF-8 if letters look wrong."
    lines = [line.strip() for line in text.replace("\r", "\n").split("\n")]
    return ", ".join(line for line in lines if line), warning


def clean(text: str) -> str:
    """Collapse whitespace and drop empty comma-separated parts left by substitution."""
    parts = [" ".join(part.split()) for part in text.split(",")]
    return ", ".join(part for part in parts if part)


def has_word(text: str, word: str) -> bool:
    return bool(word) and re.search(_word_pattern(word), text, re.IGNORECASE) is not None


def _word_pattern(word: str) -> str:
    return rf"(?<!\w){re.escape(word)}(?!\w)"


def insert_tokens(caption: str, instance_token: str, class_token: str) -> str:
    """Make sure the caption names the instance token, by the rule in the module docstring."""
    if not instance_token or has_word(caption, instance_token):
        return caption
    if class_token and has_word(caption, class_token):
        return re.sub(_word_pattern(class_token), lambda m: f"{instance_token} {m.group(0)}", caption, count=1,
                      flags=re.IGNORECASE)
    phrase = f"{instance_token} {class_token}".strip()
    return f"{phrase}, {caption}" if caption else phrase


def fill_template(template: str, caption: str | None, token: str, class_token: str) -> str:
    """Substitute [filewords] with the caption, inserting `token` where the result lacks it."""
    if FILEWORDS not in template:
        return clean(template)
    rest = template.replace(FILEWORDS, "")
    words = caption or ""
    if words and not has_word(rest, token):
        words = insert_tokens(words, token, class_token) if token != class_token else _ensure(words, token)
    filled = clean(template.replace(FILEWORDS, words))
    return filled or clean(f"{token} {class_token}" if token != class_token else token)


def _ensure(caption: str, token: str) -> str:
    return caption if not token or has_word(caption, token) else f"{token}, {caption}"


def instance_caption(concept: Concept, caption: str | None) -> str:
    template = concept.instance_prompt.strip()
    if not template:
        template = FILEWORDS if caption else f"{concept.instance_token} {concept.class_token}"
    return fill_template(template, caption, concept.instance_token.strip(), concept.class_token.strip())


def class_caption(concept: Concept, caption: str | None) -> str:
    template = concept.class_prompt.strip() or (FILEWORDS if caption else concept.class_token)
    token = concept.class_token.strip()
    return fill_template(template, caption, token, token)


def estimated_tokens(caption: str) -> int:
    """A lower bound of the CLIP token count (BPE can only split further)."""
    return len(_TOKEN_PATTERN.findall(caption))


def build_caption(item: BatchItem, config: TrainingConfig) -> str:
    """The caption trained for this item: dropout to '' with `caption_dropout`, else tags shuffled.

    Deterministic from the item's seed, so a resumed run trains the same captions.
    """
    rng = np.random.default_rng([item.seed, 1])
    caption = item.record.caption
    if config.caption_dropout > 0 and rng.random() < config.caption_dropout:
        return ""
    if config.shuffle_tags:
        caption = shuffle_tags(caption, config.keep_tokens, rng)
    return caption


def shuffle_tags(caption: str, keep: int, rng: np.random.Generator) -> str:
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    fixed, moving = tags[:keep], tags[keep:]
    order = rng.permutation(len(moving)) if moving else []
    return ", ".join(fixed + [moving[i] for i in order])
