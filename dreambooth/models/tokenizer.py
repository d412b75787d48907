"""The real CLIP BPE tokenizer, built offline from the vocabulary file open_clip ships.

No package ships CLIP weights, but open_clip_torch ships `bpe_simple_vocab_16e6.txt.gz`; the
`vocab.json` and `merges.txt` of openai/clip-vit-large-patch14 are derived from it the way
OpenAI's original tokenizer does (byte alphabet, the same with an end-of-word mark, the first
48894 merges, then the two special tokens). The generated files ship in
`dreambooth/resources/tokenizer/`, so nothing is read from the hub.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from ..atomic import write_json, write_text
from ..errors import ModelError

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "resources" / "tokenizer"
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's vocabulary: 256 bytes + 256 bytes with "</w>" + merges + 2 special tokens = 49408.
MERGE_COUNT = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def read_merges(gz_path: str | Path) -> list[tuple[str, str]]:
    """The merges CLIP uses: lines 1..48894 of the gzipped BPE file (line 0 is a header)."""
    lines = gzip.open(gz_path, "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1:MERGE_COUNT + 1]]  # type: ignore[misc]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [char + "</w>" for char in alphabet] + ["".join(pair) for pair in merges] + [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}


def tokenizer_config(pad_token: str = EOS) -> dict[str, Any]:
    """A tokenizer_config.json both transformers 4.30 and 5.x read."""
    return {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
            "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token,
            "errors": "replace", "add_prefix_space": False}


def build_clip_vocab(gz_path: str | Path, out_dir: str | Path) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for CLIP into `out_dir`."""
    out = Path(out_dir)
    merges = read_merges(gz_path)
    # One line in id order, as in the hub's files (961143 and 524619 bytes).
    write_text(out / "vocab.json", json.dumps(clip_vocab(merges), ensure_ascii=False))
    write_text(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    write_json(out / "tokenizer_config.json", tokenizer_config())
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (out / name).chmod(0o644)  # package data: readable by everyone, unlike temp files' 0600
    return out


def open_clip_vocab_path() -> Path:
    """Where open_clip_torch keeps its BPE file, found without importing open_clip (it needs torchvision)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed; it ships bpe_simple_vocab_16e6.txt.gz")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def write_tokenizer_folder(out_dir: str | Path, pad_token: str = EOS) -> Path:
    """Copy the shipped vocab/merges into a diffusers `tokenizer/` folder, with a config for `pad_token`."""
    out = Path(out_dir)
    for name in ("vocab.json", "merges.txt"):
        write_text(out / name, (TOKENIZER_DIR / name).read_text(encoding="utf-8"))
    write_json(out / "tokenizer_config.json", tokenizer_config(pad_token))
    return out


def load_tokenizer_folder(folder: str | Path, pad_token: str | None = None) -> Any:
    """A CLIPTokenizer from a folder with vocab.json + merges.txt, offline; `pad_token` overrides the folder's."""
    from transformers import CLIPTokenizer

    extra = {"pad_token": pad_token} if pad_token is not None else {}
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=MAX_LENGTH, **extra)


def load_clip_tokenizer(pad_token: str | None = None) -> Any:
    """The real CLIP tokenizer from the shipped files. SD2's and SDXL's second tokenizer pad with "!"."""
    return load_tokenizer_folder(TOKENIZER_DIR, pad_token)


# --- T5 (SD3's third text encoder, Flux's second): SentencePiece, never fetched ---------------------------
# No package ships T5's tokenizer. It is read from the model's own folder (a diffusers folder has it in its
# tokenizer folder), else from the folders a host ships it in (registered by the host adapter).
T5_FILES = ("tokenizer.json", "spiece.model")
T5_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_host_t5_dirs: list[Path] = []


def register_t5_tokenizer_dirs(folders: list[Path]) -> None:
    """Folders that hold T5 tokenizer files a host ships (searched after the model's own folder)."""
    _host_t5_dirs[:] = [Path(folder) for folder in folders]


def t5_search_dirs(model_folder: Path | None, tokenizer_folder: str) -> list[Path]:
    """Where T5's tokenizer is looked for, in order: the model's tokenizer folder, the model folder, the host's."""
    own = [model_folder / tokenizer_folder, model_folder] if model_folder is not None else []
    return [*own, *_host_t5_dirs]


def t5_tokenizer_dir(folders: list[Path]) -> Path | None:
    """The first folder with tokenizer.json or spiece.model."""
    return next((folder for folder in folders if any((folder / name).is_file() for name in T5_FILES)), None)


def missing_t5_tokenizer(folders: list[Path]) -> str:
    places = ", ".join(str(folder) for folder in folders) or "nowhere (no model folder and no host folder)"
    return (f"T5's tokenizer is missing: none of {places} holds tokenizer.json or spiece.model. Copy the "
            "T5 tokenizer folder of the model's diffusers release (SD3: tokenizer_3, Flux: tokenizer_2; its "
            "tokenizer.json or spiece.model) into the model folder; tokenizers are never downloaded.")


def read_t5_tokenizer(folder: Path) -> Any:
    """T5's tokenizer from spiece.model (SentencePiece) or tokenizer.json, whichever this installation reads:
    tokenizer.json files written by recent `tokenizers` fail to parse in the old one A1111 1.10 pins, and
    spiece.model needs the sentencepiece package."""
    from transformers import T5Tokenizer, T5TokenizerFast

    failures = []
    for name, cls in (("spiece.model", T5Tokenizer), ("tokenizer.json", T5TokenizerFast)):
        if not (folder / name).is_file():
            continue
        try:
            return cls.from_pretrained(str(folder), local_files_only=True)
        except Exception as error:  # noqa: BLE001 - missing sentencepiece, a tokenizer.json of a newer format
            failures.append(f"{name}: {str(error).strip().splitlines()[-1] if str(error).strip() else error!r}")
    raise ModelError(f"T5's tokenizer in {folder} cannot be read by this installation ({'; '.join(failures)}); "
                     "install the sentencepiece package, or provide the other file (spiece.model or tokenizer.json).")


def load_t5_tokenizer(model_folder: Path | None, encoder: Any) -> Any | None:
    """The tokenizer of a T5 `encoder` (a families.TextEncoder); None when no folder holds its files."""
    found = t5_tokenizer_dir(t5_search_dirs(model_folder, encoder.tokenizer_folder))
    return None if found is None else read_t5_tokenizer(found)


def copy_t5_tokenizer(tokenizer: Any, out_dir: Path) -> Path:
    """Write the files the tokenizer was read from into `out_dir` unchanged (readable by every transformers)."""
    source = Path(tokenizer.name_or_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = False
    for name in (*T5_FILES, *T5_SIDE_FILES):
        if (source / name).is_file():
            (out_dir / name).write_bytes((source / name).read_bytes())
            copied = True
    if not copied:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir
