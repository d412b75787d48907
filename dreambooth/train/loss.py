"""The diffusion training loss: targets, element-wise losses, min-SNR weights, masks and per-sample weights."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def add_noise(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    return scheduler.add_noise(latents, noise, timesteps)


def compute_snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep (as diffusers.training_utils)."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar).clamp(min=1e-12)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma)/SNR for epsilon, /(SNR+1) for v."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    weights = clipped / snr.clamp(min=1e-12)
    # With a zero-terminal-SNR schedule the last step has SNR 0; give it weight 1 instead of 0/0.
    return torch.where(snr > 0, weights, torch.ones_like(weights))


def flow_loss_weights(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample weights of the velocity loss by noise level (the SD3 paper's weightings, with the formulas
    of diffusers.training_utils.compute_loss_weighting_for_sd3): sigma_sqrt 1/sigma^2, cosmap
    2 / (pi (1 - 2 sigma + 2 sigma^2)), none 1."""
    sigmas = sigmas.float()
    if scheme == "sigma_sqrt":
        return sigmas.clamp(min=1e-6) ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    if scheme == "none":
        return torch.ones_like(sigmas)
    raise ConfigError(f"Setting 'flow_loss_weighting': {scheme!r} is not supported; use none, sigma_sqrt or cosmap.")


def elementwise_loss(prediction: torch.Tensor, wanted: torch.Tensor, loss_type: str,
                     huber_c: float) -> torch.Tensor:
    prediction, wanted = prediction.float(), wanted.float()
    if loss_type == "l2":
        return F.mse_loss(prediction, wanted, reduction="none")
    if loss_type == "huber":
        # Pseudo-Huber: 2c(sqrt((x-y)^2 + c^2) - c), quadratic near 0 and linear beyond c.
        return 2 * huber_c * (torch.sqrt((prediction - wanted) ** 2 + huber_c**2) - huber_c)
    if loss_type == "smooth_l1":
        return F.smooth_l1_loss(prediction, wanted, reduction="none", beta=huber_c)
    raise ConfigError(f"Setting 'loss_type': {loss_type!r} is not supported; use l2, huber or smooth_l1.")


def per_sample_loss(elements: torch.Tensor, pixel_weights: torch.Tensor | None,
                    normalize_by_area: bool) -> torch.Tensor:
    """Mean loss of each sample (B,), weighted by the pixel weights (B,1,H,W) when given.

    The weights come from the masks (`train.data.pixels.load_mask`, the one mask-weight formula).

    Normalising by the masked area divides by the mean weight, so a small mask trains as strongly as a large
    one (OneTrainer's 'normalize masked area loss').
    """
    if pixel_weights is None:
        return elements.mean(dim=(1, 2, 3))
    weighted = (elements * pixel_weights).mean(dim=(1, 2, 3))
    if normalize_by_area:
        weighted = weighted / pixel_weights.mean(dim=(1, 2, 3)).clamp(min=1e-6)
    return weighted


def batch_loss(per_sample: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the batch: sum(w_i * l_i) / batch size.

    Dividing by the batch size (not the weight sum) keeps each sample's contribution proportional to its own
    weight: prior_loss_weight 0 removes class images' gradient without inflating the instance images'.
    """
    return (per_sample * sample_weights).sum() / per_sample.shape[0]
