"""Training noise: per-sample seeded Gaussian noise, offset (zero-frequency) noise, pyramid noise,
input perturbation, timestep sampling (DDPM steps; flow matching's noise levels) and the zero-terminal-SNR
rescale of the schedule.

Noise is drawn per sample from that sample's own seed, so a sample gets the same noise whether it is
trained alone, in a bigger batch, on another rank or after a resume.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def sample_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for one sample at one optimizer step (deterministic, independent of batch layout)."""
    mixed = (int(seed) * 1_000_003 + int(step) * 7919) % (2**63 - 1)
    return torch.Generator("cpu").manual_seed(mixed)


def pyramid_noise(shape: tuple[int, ...], generator: torch.Generator, iterations: int,
                  discount: float) -> torch.Tensor:
    """Multi-resolution noise: white noise plus upscaled coarser noise at discount**level, rescaled to unit std.

    Follows the multires-noise recipe (kohya's multires_noise_iterations/discount): each level halves the
    resolution (down to 1 pixel), its noise is bilinearly upsampled and weighted by discount**level.
    """
    channels, height, width = shape
    noise = torch.randn(shape, generator=generator)
    for level in range(1, iterations + 1):
        scale = 2**level
        low_h, low_w = max(1, height // scale), max(1, width // scale)
        coarse = torch.randn((1, channels, low_h, low_w), generator=generator)
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear")[0] * discount**level
        if low_h == 1 and low_w == 1:
            break
    return noise / noise.std()


def sample_noise(shape: tuple[int, ...], generator: torch.Generator, offset: float, pyramid_iterations: int,
                 pyramid_discount: float) -> torch.Tensor:
    """Noise for one latent (C,H,W): Gaussian or pyramid, plus offset noise constant per channel."""
    if pyramid_iterations > 0:
        noise = pyramid_noise(shape, generator, pyramid_iterations, pyramid_discount)
    else:
        noise = torch.randn(shape, generator=generator)
    if offset > 0:
        # Zero-frequency noise: one value per channel shifts the whole image's mean brightness/colour.
        noise = noise + offset * torch.randn((shape[0], 1, 1), generator=generator)
    return noise


def sample_timestep(generator: torch.Generator, num_train_timesteps: int) -> int:
    return int(torch.randint(0, num_train_timesteps, (1,), generator=generator))


def batch_noise(latent_shape: tuple[int, ...], seeds: list[int], step: int, config: Any,
                num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, input noise, timesteps) for a batch; input noise adds the input perturbation, if any."""
    noises, inputs, steps = [], [], []
    for seed in seeds:
        generator = sample_generator(seed, step)
        steps.append(sample_timestep(generator, num_train_timesteps))
        noise = sample_noise(latent_shape, generator, config.offset_noise, config.pyramid_noise_iterations,
                             config.pyramid_noise_discount)
        noises.append(noise)
        inputs.append(perturb(noise, config.input_perturbation, generator))
    return torch.stack(noises), torch.stack(inputs), torch.tensor(steps, dtype=torch.long)


def flow_timestep(generator: torch.Generator, sampling: str, logit_mean: float, logit_std: float,
                  mode_scale: float) -> float:
    """A flow-matching noise level t in (0, 1) (t = 1: pure noise) from the densities of the SD3 paper
    (Esser et al. 2024, section 3.1): logit-normal, 'mode' with scale s, or uniform. The same formulas as
    diffusers.training_utils.compute_density_for_timestep_sampling, drawn from the sample's own generator
    (diffusers' draws from the global one, and diffusers 0.31 takes no generator)."""
    if sampling == "logit_normal":
        return float(torch.sigmoid(torch.randn((1,), generator=generator) * logit_std + logit_mean))
    u = float(torch.rand((1,), generator=generator))
    if sampling == "mode":
        return 1.0 - u - mode_scale * (math.cos(math.pi * u / 2) ** 2 - 1.0 + u)
    return u


def shift_timestep(t: float, shift: float) -> float:
    """The paper's resolution shift of a noise level, t' = s t / (1 + (s - 1) t), as FlowMatchEulerDiscreteScheduler
    shifts its sigmas."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_batch_noise(latent_shape: tuple[int, ...], seeds: list[int], step: int, config: Any,
                     shift: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, input noise, sigmas) for a flow-matching batch, each sample from its own seed as batch_noise;
    `shift` is the model's for this latent size (default: 'flow_shift')."""
    noises, inputs, sigmas = [], [], []
    for seed in seeds:
        generator = sample_generator(seed, step)
        t = flow_timestep(generator, config.flow_timestep_sampling, config.flow_logit_mean, config.flow_logit_std,
                          config.flow_mode_scale)
        sigmas.append(shift_timestep(t, config.flow_shift if shift is None else shift))
        noise = sample_noise(latent_shape, generator, config.offset_noise, config.pyramid_noise_iterations,
                             config.pyramid_noise_discount)
        noises.append(noise)
        inputs.append(perturb(noise, config.input_perturbation, generator))
    return torch.stack(noises), torch.stack(inputs), torch.tensor(sigmas, dtype=torch.float32)


def perturb(noise: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Input perturbation (Ning et al.): the noisy input gets extra noise, the target keeps the original."""
    if amount <= 0:
        return noise
    return noise + amount * torch.randn(noise.shape, generator=generator)


def training_scheduler(scheduler: Any, zero_terminal_snr: bool) -> Any:
    """The noise scheduler used for training: the model's, or a copy whose betas are (or are no longer)
    rescaled to zero terminal SNR where the setting differs from the model's schedule."""
    if bool(scheduler.config.get("rescale_betas_zero_snr", False)) == zero_terminal_snr:
        return scheduler
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=zero_terminal_snr)
