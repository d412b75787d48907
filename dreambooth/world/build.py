"""Build the shapes world's base model and evaluator from nothing, deterministically.

    python -m dreambooth.world.build [--quick] [--out DIR]

Three trainings, each from a fixed seed on one CPU thread with deterministic kernels (so a build on the same
machine and library versions gives the same bytes): the VAE on world pictures of every colour (pink too, and
dots at a higher rate, so it draws what fine-tunes will ask of it); UNet and text encoder together on VAE
latents of captioned pictures of the six base colours, with 10 % empty captions for classifier-free guidance;
the evaluator on drawn pictures, their VAE round trips and shapeless noise. `--quick` runs a few steps of each
(the reproducibility test). Writes world-base.safetensors, evaluator.safetensors and world.json (the recipe,
versions and digests) into DIR (default: the package's resources/world).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import atomic
from .evaluator import COLOUR_CLASSES, HEADS, NO_SHAPE, SHAPE_CLASSES, ShapeNet, pixels_of
from .model import (
    RESOURCE_DIR,
    compact_embedding,
    digest,
    full_embedding,
    is_compact,
    rewrite,
    world_configs,
    world_token_ids,
)
from .scenes import ALL_COLOURS, BACKGROUNDS, COLOURS, Scene, caption, draw, random_scene

Log = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """Everything a build depends on besides the code and library versions."""

    seed: int = 0
    pictures: int = 4096           # captioned pictures the base model learns from
    vae_steps: int = 2400
    vae_batch: int = 8
    vae_lr: float = 3e-3
    vae_latent_noise: float = 0.1  # the decoder learns from slightly noisy latents, as diffusion gives it
    vae_shape_weight: float = 4.0  # extra loss weight on shape pixels: a fifth of the picture, all its colour
    base_steps: int = 3000
    base_batch: int = 32
    base_lr: float = 1e-3
    min_snr_gamma: float = 5.0
    # v-prediction on a zero-terminal-SNR schedule (Lin et al. 2023): with SD's own schedule the last timestep
    # keeps 7 % of the picture, an 8x8 latent's noise then decides the shape's colour, and a fine-tune cannot
    # teach a subject's colour to more than ~65 % of seeds (measured on the epsilon base this replaced).
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    empty_caption: float = 0.1     # classifier-free guidance needs the unconditional prediction
    keep_colour: float = 0.8       # "a circle" must mean a circle of any colour
    keep_background: float = 0.5
    dot_rate: float = 0.25
    evaluator_steps: int = 1200
    evaluator_batch: int = 32
    evaluator_lr: float = 3e-3
    evaluator_pool: int = 2048     # drawn pictures and as many VAE round trips

    def quick(self) -> Recipe:
        """A few steps of everything: what the reproducibility test builds twice."""
        return replace(self, pictures=32, vae_steps=3, base_steps=3, base_batch=8, evaluator_steps=3,
                       evaluator_pool=32)


# --- determinism and data ----------------------------------------------------------------------------

@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """One thread, deterministic kernels and a seeded global generator, restored afterwards."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(strict)


def pictures(scenes: list[Scene]) -> torch.Tensor:
    return pixels_of([draw(scene) for scene in scenes])


def warmup_cosine(steps: int, warmup: int = 50) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))


def optimiser(parameters: list[torch.nn.Parameter], lr: float, steps: int) -> tuple[Any, Any]:
    adam = torch.optim.AdamW(parameters, lr, betas=(0.9, 0.99), weight_decay=0.0)
    return adam, torch.optim.lr_scheduler.LambdaLR(adam, warmup_cosine(steps))


def update(loss: torch.Tensor, parameters: list[torch.nn.Parameter], adam: Any, schedule: Any) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    adam.step()
    adam.zero_grad(set_to_none=True)
    schedule.step()


def report(log: Log, name: str, step: int, steps: int, loss: torch.Tensor, started: float) -> None:
    if step % max(1, steps // 10) == 0 or step == steps - 1:
        log(f"{name} step {step + 1}/{steps}: loss {loss.item():.4f} ({time.monotonic() - started:.0f} s)")


# --- the VAE -------------------------------------------------------------------------------------------

def shape_weights(batch: torch.Tensor, extra: float) -> torch.Tensor:
    """1 on the background (the corner pixel's colour), 1 + extra on the shape and its dot."""
    shape = ((batch - batch[:, :, :1, :1]).abs().sum(dim=1, keepdim=True) > 0.1).float()
    return 1.0 + extra * shape


def train_vae(recipe: Recipe, log: Log) -> Any:
    """An AutoencoderKL for 64 px world pictures: MSE + L1 reconstruction (weighted toward the shape) from the
    mean plus a little noise, and a small KL term that keeps the latents centred.

    Its groups of norm channels are 4 wide: with one channel per group the norms erase the colours."""
    from diffusers import AutoencoderKL

    rng = np.random.default_rng(recipe.seed + 1)
    data = pictures([random_scene(rng, tuple(ALL_COLOURS), dot_rate=0.4) for _ in range(recipe.pictures)])
    vae = AutoencoderKL.from_config(world_configs()["vae"])
    parameters = list(vae.parameters())
    adam, schedule = optimiser(parameters, recipe.vae_lr, recipe.vae_steps)
    generator, started = torch.Generator().manual_seed(recipe.seed + 2), time.monotonic()
    for step in range(recipe.vae_steps):
        batch = data[torch.randint(0, len(data), (recipe.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator) * recipe.vae_latent_noise
        decoded = vae.decode(posterior.mean + noise).sample
        error, weights = decoded - batch, shape_weights(batch, recipe.vae_shape_weight)
        reconstruction = ((error.pow(2) + 0.5 * error.abs()) * weights).mean() / weights.mean()
        loss = reconstruction + 1e-6 * posterior.kl().mean()
        update(loss, parameters, adam, schedule)
        report(log, "VAE", step, recipe.vae_steps, loss, started)
    return vae.eval()


def encode(vae: Any, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([vae.encode(pixels[i:i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)])


def set_scaling_factor(vae: Any, latents: torch.Tensor) -> float:
    """SD's rule: the factor that gives the training latents unit standard deviation (rounded, so the config
    prints the same everywhere)."""
    factor = round(1.0 / float(latents.std()), 5)
    vae.register_to_config(scaling_factor=factor)
    return factor


# --- UNet and text encoder ------------------------------------------------------------------------------

class Captions:
    """Caption variants drawn per step, tokenised as the pipeline does (padded to 77 with the end token)."""

    def __init__(self, scenes: list[Scene], recipe: Recipe, tokenizer: Any):
        self.scenes, self.recipe, self.tokenizer = scenes, recipe, tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def text(self, scene: Scene, draws: list[float]) -> str:
        if draws[0] < self.recipe.empty_caption:
            return ""
        return caption(scene, colour=draws[1] < self.recipe.keep_colour,
                       background=draws[2] < self.recipe.keep_background)

    def ids(self, text: str) -> torch.Tensor:
        if text not in self.cache:
            self.cache[text] = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                                              truncation=True, return_tensors="pt").input_ids[0]
        return self.cache[text]

    def batch(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        draws = torch.rand((len(indices), 3), generator=generator).tolist()
        return torch.stack([self.ids(self.text(self.scenes[i], d)) for i, d in zip(indices, draws, strict=True)])


def min_snr_weights(schedule: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): the objective's own weight of the x0 error (SNR for
    epsilon, SNR + 1 for v) capped at gamma. For v that is 1 at high noise, where the shape's colour is decided
    and where min(SNR, gamma) / (SNR + 1) would give the zero-SNR timestep no weight at all."""
    alphas = schedule.alphas_cumprod[timesteps]
    snr = alphas / (1.0 - alphas)
    own = snr + 1.0 if schedule.config.prediction_type == "v_prediction" else snr
    return torch.clamp(own, max=gamma) / own


def target_of(schedule: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    if schedule.config.prediction_type == "v_prediction":
        return schedule.get_velocity(latents, noise, timesteps)
    return noise


def base_schedule(recipe: Recipe) -> Any:
    from ..families import get_family

    return get_family("sd1").make_noise_scheduler(recipe.prediction_type, recipe.zero_terminal_snr)


def train_base(recipe: Recipe, vae: Any, log: Log) -> tuple[Any, Any]:
    """UNet and text encoder trained together on the captioned world (the recipe's prediction type and
    schedule)."""
    from ..families import get_family
    from ..models.tiny import build_models

    rng = np.random.default_rng(recipe.seed + 3)
    scenes = [random_scene(rng, tuple(COLOURS), dot_rate=recipe.dot_rate) for _ in range(recipe.pictures)]
    latents = encode(vae, pictures(scenes))
    latents = latents * set_scaling_factor(vae, latents)
    unet, _, [text_encoder] = build_models(world_configs(), "sd1")
    family = get_family("sd1")
    captions, schedule = Captions(scenes, recipe, family.tokenizers()[0]), base_schedule(recipe)
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    adam, lr_schedule = optimiser(parameters, recipe.base_lr, recipe.base_steps)
    generator, started = torch.Generator().manual_seed(recipe.seed + 4), time.monotonic()
    for step in range(recipe.base_steps):
        indices = torch.randint(0, len(scenes), (recipe.base_batch,), generator=generator)
        hidden = text_encoder(captions.batch(indices.tolist(), generator))[0]
        noise = torch.randn(latents[indices].shape, generator=generator)
        timesteps = torch.randint(0, schedule.config.num_train_timesteps, (len(indices),), generator=generator)
        predicted = unet(schedule.add_noise(latents[indices], noise, timesteps), timesteps, hidden).sample
        target = target_of(schedule, latents[indices], noise, timesteps)
        per_sample = (predicted - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(schedule, timesteps, recipe.min_snr_gamma)).mean()
        update(loss, parameters, adam, lr_schedule)
        report(log, "UNet+text", step, recipe.base_steps, loss, started)
    return unet.eval(), text_encoder.eval()


# --- the evaluator --------------------------------------------------------------------------------------

IGNORE = -100  # cross_entropy's ignore_index: no colour, background or dot to learn for a shapeless picture


def labels_of(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    rows = {"shape": [SHAPE_CLASSES.index(s.shape) for s in scenes],
            "colour": [COLOUR_CLASSES.index(s.colour) for s in scenes],
            "background": [list(BACKGROUNDS).index(s.background) for s in scenes],
            "dot": [int(s.dot) for s in scenes]}
    return {name: torch.tensor(values) for name, values in rows.items()}


def shapeless(vae: Any, count: int, generator: torch.Generator) -> torch.Tensor:
    """Pictures with no shape: decoded random latents (what an untrained denoiser gives) and plain backgrounds."""
    factor = vae.config.scaling_factor
    with torch.no_grad():
        latents = torch.randn((count - count // 2, 4, 8, 8), generator=generator) / factor
        decoded = vae.decode(latents).sample.clamp(-1, 1)
    shades = torch.rand((count // 2, 3, 1, 1), generator=generator) * 2 - 1
    return torch.cat([decoded, shades.expand(-1, -1, 64, 64)])


def evaluator_data(recipe: Recipe, vae: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Drawn pictures of every colour, their VAE round trips, and shapeless pictures, with labels."""
    rng = np.random.default_rng(recipe.seed + 5)
    scenes = [random_scene(rng, tuple(ALL_COLOURS), dot_rate=0.5) for _ in range(recipe.evaluator_pool)]
    drawn = pictures(scenes)
    with torch.no_grad():
        round_trips = torch.cat([vae.decode(encode(vae, drawn[i:i + 256])).sample.clamp(-1, 1)
                                 for i in range(0, len(drawn), 256)])
    blank = shapeless(vae, recipe.evaluator_pool // 4, torch.Generator().manual_seed(recipe.seed + 6))
    labels = labels_of(scenes)
    none = {name: torch.full((len(blank),), IGNORE) for name in HEADS}
    none["shape"] = torch.full((len(blank),), SHAPE_CLASSES.index(NO_SHAPE))
    joined = {name: torch.cat([labels[name], labels[name], none[name]]) for name in HEADS}
    return torch.cat([drawn, round_trips, blank]), joined


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sampling noise and small colour casts, as generated pictures have."""
    shape = pixels.shape
    noise = torch.randn(shape, generator=generator) * torch.rand((shape[0], 1, 1, 1), generator=generator) * 0.08
    cast = (torch.rand((shape[0], 3, 1, 1), generator=generator) - 0.5) * 0.1
    return (pixels + noise + cast).clamp(-1, 1)


def train_evaluator(recipe: Recipe, vae: Any, log: Log) -> ShapeNet:
    pixels, labels = evaluator_data(recipe, vae)
    net = ShapeNet()
    parameters = list(net.parameters())
    adam, schedule = optimiser(parameters, recipe.evaluator_lr, recipe.evaluator_steps)
    generator, started = torch.Generator().manual_seed(recipe.seed + 7), time.monotonic()
    for step in range(recipe.evaluator_steps):
        indices = torch.randint(0, len(pixels), (recipe.evaluator_batch,), generator=generator)
        logits = net(augment(pixels[indices], generator))
        loss = sum(torch.nn.functional.cross_entropy(logits[name], labels[name][indices], ignore_index=IGNORE)
                   for name in HEADS if bool((labels[name][indices] != IGNORE).any()))
        update(loss, parameters, adam, schedule)
        report(log, "evaluator", step, recipe.evaluator_steps, loss, started)
    return net.eval()


# --- writing -------------------------------------------------------------------------------------------

def base_components(recipe: Recipe, unet: Any, vae: Any, text_encoder: Any) -> Any:
    from ..families import get_family
    from ..models.components import Components

    return Components(family="sd1", denoiser=unet, vae=vae, text_encoders=[text_encoder],
                      tokenizers=get_family("sd1").tokenizers(), noise_scheduler=base_schedule(recipe),
                      prediction_type=recipe.prediction_type)


BASE_NAME, EVALUATOR_NAME = "world-base.safetensors", "evaluator.safetensors"


def write_base(components: Any, out_dir: Path) -> Path:
    """The base model as an fp16 SD 1.x single file carrying its component configs."""
    from ..models.export import export_checkpoint
    from ..models.loading import CONFIGS_METADATA_KEY

    configs = world_configs(components.vae.config.scaling_factor)
    metadata = {CONFIGS_METADATA_KEY: json.dumps(configs), "dreambooth_demo": "true",
                "dreambooth_base_model": "shapes world (python -m dreambooth.world.build)"}
    return export_checkpoint(components, out_dir / BASE_NAME, precision="fp16", metadata=metadata)


def write_evaluator(net: ShapeNet, out_dir: Path) -> Path:
    from safetensors.torch import save_file

    with atomic.atomic_path(out_dir / EVALUATOR_NAME) as temp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(temp))
    return out_dir / EVALUATOR_NAME


def write_record(recipe: Recipe, out_dir: Path) -> dict[str, Any]:
    record = {"recipe": asdict(recipe), "versions": versions(),
              "digest": {name: digest(out_dir / name) for name in (BASE_NAME, EVALUATOR_NAME)}}
    atomic.write_json(out_dir / "world.json", record)
    return record


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def build_base(recipe: Recipe, out_dir: Path, log: Log) -> Path:
    with deterministic(recipe.seed):
        vae = train_vae(recipe, log)
        unet, text_encoder = train_base(recipe, vae, log)
    return write_base(base_components(recipe, unet, vae, text_encoder), out_dir)


def compact_base(out_dir: Path) -> Path:
    """The base file rewritten in place with only the world's rows of its token embedding (see world.model)."""
    from ..families import get_family

    keep = world_token_ids(get_family("sd1").tokenizers()[0])
    path = out_dir / BASE_NAME
    return rewrite(path, path, lambda tensors: compact_embedding(tensors, keep))


def base_vae(path: Path) -> Any:
    """The VAE of a base file, compact or not (the VAE does not depend on the token embedding)."""
    import tempfile

    from ..models.loading import load_checkpoint

    if not is_compact(path):
        return load_checkpoint(path).vae
    with tempfile.TemporaryDirectory() as folder:
        return load_checkpoint(rewrite(path, Path(folder) / BASE_NAME, full_embedding)).vae


def build_evaluator(recipe: Recipe, out_dir: Path, log: Log) -> Path:
    """The evaluator, trained on round trips through the VAE as written (fp16), so that it depends only on the
    base file and the recipe: `--evaluator-only` retrains it from a shipped base and gets the same bytes."""
    vae = base_vae(out_dir / BASE_NAME)  # loaded first: building the models draws random numbers
    with deterministic(recipe.seed):
        return write_evaluator(train_evaluator(recipe, vae, log), out_dir)


def build(recipe: Recipe, out_dir: Path, log: Log = print, base: bool = True) -> dict[str, Any]:
    """Train everything from `recipe` and write it into `out_dir` (with `base=False` only the evaluator, from
    the base file already there); returns the record (world.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if base:
        build_base(recipe, out_dir, log)
    build_evaluator(recipe, out_dir, log)
    if base:
        compact_base(out_dir)
    return write_record(recipe, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreambooth.world.build", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of each training (for tests)")
    parser.add_argument("--evaluator-only", action="store_true",
                        help="retrain only the evaluator, from the base model already in the output folder")
    parser.add_argument("--out", type=Path, default=RESOURCE_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    recipe = Recipe().quick() if args.quick else Recipe()
    started = time.monotonic()
    record = build(recipe, args.out, lambda text: print(text, flush=True), base=not args.evaluator_only)
    print(f"built in {time.monotonic() - started:.0f} s: {json.dumps(record['digest'], indent=1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
