"""What a training step minimises: per-sample losses of one batch, one objective per prediction kind.

An objective takes the session and a loaded batch and returns one loss per sample (prior and mask weighting
happen outside). Epsilon and v-prediction share the DDPM forward process and differ in the target and the
min-SNR weighting; flow matching (SD3, Flux) interpolates linearly between image and noise and predicts the
velocity. `objective_for` chooses by prediction type; the family's `predict` calls its denoiser, so the loop
knows neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import ConfigError, DataError
from ..families.clip_text import EncodedText
from . import data as data_api
from . import loss as losses
from . import noise as noises
from . import runtime
from .data.batching import BatchItem
from .session import Session


@dataclass
class Batch:
    """The items of one micro-batch whose images could be read, with their latents and pixel weights."""

    items: list[BatchItem]
    latents: torch.Tensor
    pixel_weights: torch.Tensor | None
    step: int
    perturb_input: bool  # input perturbation is for training; validation measures at fixed noise
    training: bool       # a training batch (observers see its captions) rather than a validation one


class Objective(Protocol):
    name: str

    def per_sample_losses(self, session: Session, batch: Batch) -> torch.Tensor: ...


class DiffusionObjective:
    """The DDPM forward process: noise a clean latent at a timestep, predict, compare with `target`."""

    name = "diffusion"

    def per_sample_losses(self, session: Session, batch: Batch) -> torch.Tensor:
        config, device = session.config, session.device
        seeds = [item.seed for item in batch.items]
        noise, input_noise, timesteps = noises.batch_noise(tuple(batch.latents.shape[1:]), seeds, batch.step, config,
                                                          session.noise_scheduler.config.num_train_timesteps)
        noise, timesteps = noise.to(device), timesteps.to(device)
        input_noise = input_noise.to(device) if batch.perturb_input else noise
        noisy = losses.add_noise(session.noise_scheduler, batch.latents, input_noise, timesteps)
        wanted = self.target(session.noise_scheduler, batch.latents, noise, timesteps)
        per_sample = compared(session, batch, predict(session, batch, noisy, timesteps), wanted)
        if config.min_snr_gamma > 0:
            assert session.alphas_cumprod is not None  # DDPM schedules have one
            snr = losses.compute_snr(session.alphas_cumprod, timesteps)
            per_sample = per_sample * self.snr_weights(snr, config.min_snr_gamma)
        return per_sample

    def target(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet should predict for clean `latents` noised with `noise` at `timesteps`."""
        raise NotImplementedError

    def snr_weights(self, snr: torch.Tensor, gamma: float) -> torch.Tensor:
        return losses.min_snr_weights(snr, gamma, self.name)


class EpsilonObjective(DiffusionObjective):
    """Predict the added noise (SD 1.x, SD 2.x-base, SDXL); min-SNR weights min(SNR, gamma) / SNR."""

    name = "epsilon"

    def target(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor) -> torch.Tensor:
        return noise


class VPredictionObjective(DiffusionObjective):
    """Predict the velocity sqrt(ab) eps - sqrt(1-ab) x0 (SD 2.x 768-v); min-SNR weights divide by SNR + 1."""

    name = "v_prediction"

    def target(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor) -> torch.Tensor:
        return scheduler.get_velocity(latents, noise, timesteps)


class FlowMatchingObjective:
    """Rectified flow (SD3, SD 3.5, Flux): x_t = (1 - t) x0 + t eps at a noise level t drawn by the run's
    timestep sampling and shift; the denoiser predicts the velocity eps - x0 at timestep t x 1000 (the
    convention of FlowMatchEulerDiscreteScheduler); the loss is weighted per sample by 'flow_loss_weighting'."""

    name = "flow_matching"

    def per_sample_losses(self, session: Session, batch: Batch) -> torch.Tensor:
        config, device = session.config, session.device
        seeds = [item.seed for item in batch.items]
        shape = tuple(batch.latents.shape[1:])
        shift = session.family.flow_shift(config, shape, session.noise_scheduler.config)
        noise, input_noise, sigmas = noises.flow_batch_noise(shape, seeds, batch.step, config, shift)
        noise, sigmas = noise.to(device), sigmas.to(device)
        input_noise = input_noise.to(device) if batch.perturb_input else noise
        level = sigmas.view(-1, *[1] * (batch.latents.dim() - 1))
        noisy = (1.0 - level) * batch.latents + level * input_noise
        timesteps = sigmas * session.noise_scheduler.config.num_train_timesteps
        per_sample = compared(session, batch, predict(session, batch, noisy, timesteps), noise - batch.latents)
        return per_sample * losses.flow_loss_weights(sigmas, config.flow_loss_weighting)


OBJECTIVES: dict[str, type[Objective]] = {"epsilon": EpsilonObjective, "v_prediction": VPredictionObjective,
                                          "flow_matching": FlowMatchingObjective}


def objective_for(prediction_type: str) -> Objective:
    if prediction_type not in OBJECTIVES:
        raise ConfigError(f"Setting 'prediction_type': {prediction_type!r} is not supported; use "
                          + " or ".join(OBJECTIVES) + ".")
    return OBJECTIVES[prediction_type]()


# --- loading a batch -----------------------------------------------------------------------------------

def load_batch(session: Session, items: list[BatchItem], step: int, training: bool) -> Batch | None:
    """The batch's latents and masks, without images deleted or changed on disk since the scan (warned);
    None when none is left. Users tidy their folders while a run goes on; one vanished image must not end
    hours of training."""
    kept, latents = [], []
    for item in items:
        try:
            latents.append(session.latent_cache.get(item, session.config, lambda p: encode_pixels(session, p)))
        except DataError as error:
            session.warn(f"Skipped during training: {error}")
            continue
        kept.append(item)
    if not kept:
        return None
    stacked, pixel_weights = _latents_and_masks(session, kept, latents)
    return Batch(kept, stacked, pixel_weights, step, perturb_input=training, training=training)


def _latents_and_masks(session: Session, items: list[BatchItem], latents: list[torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    masks = [data_api.load_mask(item, session.config) for item in items]
    stacked = torch.stack(latents).to(session.device, torch.float32)
    if all(mask is None for mask in masks):
        return stacked, None
    full = [m if m is not None else torch.ones((1, *lat.shape[1:])) for m, lat in zip(masks, latents, strict=True)]
    return stacked, torch.stack(full).to(session.device, torch.float32)


@torch.no_grad()
def encode_pixels(session: Session, pixels: torch.Tensor) -> torch.Tensor:
    vae = session.components.vae
    pixels = pixels.to(session.device, next(vae.parameters()).dtype)
    # The distribution's mean: deterministic, so cached and uncached runs train the same latents.
    latent = session.family.normalise_latents(vae.encode(pixels).latent_dist.mean, vae.config)
    return latent.float()


# --- prediction and conditioning ---------------------------------------------------------------------------

def predict(session: Session, batch: Batch, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The denoiser's output for the batch, called by the family (its conditioning, its arguments)."""
    with runtime.autocast(session.config, session.device):
        encoded = conditioning(session, batch)
        return session.family.predict(session.denoiser, noisy, timesteps, encoded, batch.items, session.device,
                                      encoded.hidden.dtype)


def compared(session: Session, batch: Batch, prediction: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Per-sample loss of a prediction against its target: the loss type, masks and area normalisation."""
    config = session.config
    elements = losses.elementwise_loss(prediction, wanted, config.loss_type, config.huber_c)
    return losses.per_sample_loss(elements, batch.pixel_weights, config.normalize_masked_area_loss)


def conditioning(session: Session, batch: Batch) -> EncodedText:
    """The batch's captions encoded for the denoiser (observers see the captions of training batches)."""
    captions = [data_api.build_caption(item, session.config) for item in batch.items]
    if batch.training:
        for observer in session.observers:
            observer.on_captions(batch.step, list(captions))
    return encode_text(session, captions)


def _encode(session: Session, captions: list[str]) -> EncodedText:
    return session.family.encode_text(session.text_encoders, session.components.tokenizers, captions,
                                      session.config, session.device, session.warn)


def encode_text(session: Session, captions: list[str]) -> EncodedText:
    if session.text_cache is not None:
        return _cached_text(session, captions)
    with torch.set_grad_enabled(session.trains_text and torch.is_grad_enabled()):
        return _encode(session, captions)


def _cached_text(session: Session, captions: list[str]) -> EncodedText:
    cache = session.text_cache
    assert cache is not None
    for caption in captions:
        if caption not in cache:
            with torch.no_grad():
                encoded = _encode(session, [caption])
            cache[caption] = (encoded.hidden[0], None if encoded.pooled is None else encoded.pooled[0])
    rows = [cache[c] for c in captions]
    hidden = torch.stack([r[0] for r in rows])
    pooled = torch.stack([r[1] for r in rows]) if rows[0][1] is not None else None  # type: ignore[misc]
    return EncodedText(hidden, pooled)
