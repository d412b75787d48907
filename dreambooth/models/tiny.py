"""Scaled-down random models of each family for tests and demos, with the real CLIP tokenizer.

Same structure as the real models (so the single-file key layout applies unchanged) but tiny:
two UNet levels of 32/64 channels, a four-level VAE (64 px images -> 8x8 latents, as SD's
factor 8), CLIP text encoders of width 32. Weights are random but never degenerate: tensors that
start all-zero or all-one (zero-initialised output convs, norms) get small random values, because
a freshly initialised CLIP makes A1111's prompt-emphasis rescale divide 0/0.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..families import get_family
from .components import Components


def tiny_configs(family: str) -> dict[str, dict[str, Any]]:
    """Component configs (diffusers UNet/VAE, transformers CLIP text) of the tiny model of `family`."""
    return copy.deepcopy(get_family(family).tiny_configs())


def build_models(configs: dict[str, dict[str, Any]], family: str | None = None) -> tuple[Any, Any, list[Any]]:
    """Denoiser, VAE and text encoders with freshly initialised weights from component configs.

    The classes are the family's (default: told by which text-encoder configs are present).
    """
    import diffusers

    unit = get_family(family or ("sdxl" if "text_encoder_2" in configs else "sd1"))
    denoiser = getattr(diffusers, unit.denoiser_class).from_config(configs[unit.denoiser_folder])
    vae = getattr(diffusers, unit.vae_class).from_config(configs["vae"])
    encoders = [_text_encoder(spec, configs.get(spec.folder)) for spec in unit.text_encoders]
    return denoiser, vae, encoders


def _text_encoder(spec: Any, config: dict[str, Any] | None) -> Any:
    """A fresh text encoder of the spec's class; None for an optional encoder without a config."""
    import transformers

    if config is None:
        return None
    config_class = transformers.T5Config if spec.layout == "t5" else transformers.CLIPTextConfig
    return getattr(transformers, spec.model_class)(config_class.from_dict(config))


def perturb_degenerate(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.02) -> None:
    """Give every constant parameter (all zeros, all ones) small random deviations."""
    with torch.no_grad():
        for parameter in module.parameters():
            flat = parameter.detach().reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.copy_(flat[0] + scale * noise)


def tiny_components(family: str, seed: int = 0, optional_encoders: bool = True) -> Components:
    """A tiny random model of `family` (any registered family), deterministic for a seed. Optional text encoders
    (SD3's T5) are left out without `optional_encoders` or without a tiny tokenizer for them; the other weights
    are the same either way."""
    configs = tiny_configs(family)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser, vae, encoders = build_models(configs, family)
    for module in (denoiser, vae, *encoders):
        if module is not None:
            perturb_degenerate(module, generator)
            module.eval()
    unit = get_family(family)
    extras = unit.tiny_extras(configs, generator)
    scheduler = unit.make_noise_scheduler()
    tokenizers = unit.tiny_tokenizers()
    kept = [not spec.optional or (optional_encoders and tokenizer is not None)
            for spec, tokenizer in zip(unit.text_encoders, tokenizers, strict=True)]
    return Components(family=family, denoiser=denoiser, vae=vae,
                      text_encoders=[encoder if keep else None for encoder, keep in zip(encoders, kept, strict=True)],
                      tokenizers=[tokenizer if keep else None for tokenizer, keep in zip(tokenizers, kept, strict=True)],
                      noise_scheduler=scheduler, prediction_type=unit.prediction_type, extras=extras)


# A tiny T5 tokenizer for tests and demos, trained on the fly: no package ships T5's SentencePiece model.
TINY_T5_CORPUS = ("a photo of sks dog", "photo of a dog", "a red cat sitting on the moon", "portrait of a person",
                  "sks dog wearing a blue hat in the snow", "a painting of a house by the sea")


def tiny_t5_tokenizer_dir(folder: Path) -> Path | None:
    """`folder` holding a tiny SentencePiece model (spiece.model, T5's special ids); None when the
    sentencepiece package is missing (tiny models then go without T5, which is optional where it is used)."""
    try:
        import sentencepiece
    except ImportError:
        return None
    if not (folder / "spiece.model").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "spiece.model") as tmp:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(TINY_T5_CORPUS * 20), model_prefix=str(tmp.with_suffix("")), vocab_size=64,
                hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                minloglevel=2)
            tmp.with_suffix(".model").replace(tmp)
            tmp.with_suffix(".vocab").unlink(missing_ok=True)
    return folder


def tiny_t5_tokenizer() -> Any:
    """The tiny T5 tokenizer (built once into the temp folder), for tiny models whose T5 is not optional."""
    import tempfile

    from ..errors import ModelError
    from .tokenizer import read_t5_tokenizer

    folder = tiny_t5_tokenizer_dir(Path(tempfile.gettempdir()) / "dreambooth-tiny-t5")
    if folder is None:
        raise ModelError("Tiny models with a T5 encoder (Flux) need the sentencepiece package to build their "
                         "tokenizer; install it (pip install sentencepiece).")
    return read_t5_tokenizer(folder)
