"""Loss and noise building blocks: targets, min-SNR, huber, masks, offset/pyramid noise, zero-terminal SNR."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from dreambooth.errors import ConfigError
from dreambooth.models.components import make_noise_scheduler
from dreambooth.train import loss, noise
from dreambooth.train.objectives import objective_for


def test_v_prediction_target_is_the_velocity() -> None:
    scheduler = make_noise_scheduler("sd2v")
    latents, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    alpha = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    v = objective_for("v_prediction").target(scheduler, latents, eps, t)
    assert torch.allclose(v, alpha * eps - sigma * latents, atol=1e-5)
    assert torch.equal(objective_for("epsilon").target(scheduler, latents, eps, t), eps)
    with pytest.raises(ConfigError, match="prediction_type"):
        objective_for("sample")


def test_min_snr_weights_follow_the_formula_for_both_prediction_types() -> None:
    snr = torch.tensor([0.5, 5.0, 50.0])
    assert torch.allclose(loss.min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    assert torch.allclose(loss.min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    # SNR 0 (zero-terminal schedule) gives a finite weight
    assert torch.isfinite(loss.min_snr_weights(torch.tensor([0.0]), 5.0, "epsilon")).all()


def test_compute_snr_decreases_with_timestep() -> None:
    scheduler = make_noise_scheduler("sd1")
    snr = loss.compute_snr(scheduler.alphas_cumprod, torch.tensor([0, 500, 999]))
    assert snr[0] > snr[1] > snr[2] > 0


def test_huber_is_quadratic_near_zero_and_linear_far_away() -> None:
    zero = torch.zeros(1)
    small = loss.elementwise_loss(torch.tensor([0.01]), zero, "huber", 1.0)
    assert torch.allclose(small, torch.tensor([0.01**2]), rtol=1e-2)
    big_a = loss.elementwise_loss(torch.tensor([10.0]), zero, "huber", 0.1)
    big_b = loss.elementwise_loss(torch.tensor([20.0]), zero, "huber", 0.1)
    assert torch.allclose(big_b - big_a, torch.tensor([2.0]), rtol=1e-2)  # slope 2c
    l1 = loss.elementwise_loss(torch.tensor([3.0]), zero, "smooth_l1", 0.1)
    assert torch.allclose(l1, torch.tensor([3.0 - 0.05]))
    with pytest.raises(ConfigError, match="loss_type"):
        loss.elementwise_loss(zero, zero, "l3", 0.1)


def test_mask_weights_and_area_normalisation() -> None:
    elements = torch.ones(1, 4, 2, 2)
    weights = torch.tensor([[[[1.0, 0.1], [0.1, 0.1]]]])  # a one-pixel mask at unmasked_weight 0.1
    plain = loss.per_sample_loss(elements, weights, False)
    normalised = loss.per_sample_loss(elements, weights, True)
    assert torch.allclose(plain, torch.tensor([weights.mean()]))
    assert torch.allclose(normalised, torch.tensor([1.0]))


def test_batch_loss_weights_each_sample() -> None:
    per_sample = torch.tensor([2.0, 4.0])
    assert loss.batch_loss(per_sample, torch.tensor([1.0, 0.0])) == 1.0
    assert loss.batch_loss(per_sample, torch.tensor([1.0, 0.5])) == 2.0


def _noise_config(**values: float) -> SimpleNamespace:
    base = {"offset_noise": 0.0, "pyramid_noise_iterations": 0, "pyramid_noise_discount": 0.3,
            "input_perturbation": 0.0}
    return SimpleNamespace(**{**base, **values})


def test_noise_is_a_function_of_seed_and_step_only() -> None:
    a = noise.batch_noise((4, 8, 8), [1, 2], 3, _noise_config(), 1000)
    b = noise.batch_noise((4, 8, 8), [2], 3, _noise_config(), 1000)
    assert torch.equal(a[0][1], b[0][0]) and a[2][1] == b[2][0]
    c = noise.batch_noise((4, 8, 8), [1, 2], 4, _noise_config(), 1000)
    assert not torch.equal(a[0], c[0])


def test_offset_noise_shifts_channel_means() -> None:
    plain = noise.batch_noise((4, 16, 16), list(range(64)), 0, _noise_config(), 1000)[0]
    offset = noise.batch_noise((4, 16, 16), list(range(64)), 0, _noise_config(offset_noise=0.5), 1000)[0]
    spread = lambda x: x.mean(dim=(2, 3)).std()  # noqa: E731
    assert spread(offset) > 2 * spread(plain)


def test_pyramid_noise_is_unit_variance_and_spatially_correlated() -> None:
    generator = torch.Generator().manual_seed(0)
    pyramid = noise.pyramid_noise((4, 32, 32), generator, 6, 0.8)
    white = torch.randn(4, 32, 32, generator=generator)
    assert abs(float(pyramid.std()) - 1.0) < 1e-4
    neighbour = lambda x: float((x[:, :, 1:] * x[:, :, :-1]).mean())  # noqa: E731
    assert neighbour(pyramid) > neighbour(white) + 0.2


def test_input_perturbation_changes_only_the_input_noise() -> None:
    target, model_input, _ = noise.batch_noise((4, 8, 8), [5], 0, _noise_config(input_perturbation=0.1), 1000)
    clean_target, clean_input, _ = noise.batch_noise((4, 8, 8), [5], 0, _noise_config(), 1000)
    assert torch.equal(target, clean_target) and torch.equal(clean_input, clean_target)
    assert not torch.equal(model_input, target)


def test_zero_terminal_snr_rescales_the_schedule() -> None:
    scheduler = make_noise_scheduler("sd1")
    assert noise.training_scheduler(scheduler, False) is scheduler
    rescaled = noise.training_scheduler(scheduler, True)
    assert float(rescaled.alphas_cumprod[-1]) < 1e-6 < float(scheduler.alphas_cumprod[-1])


# --- flow matching (SD3, Flux) -------------------------------------------------------------------------------

def _diffusers_training_utils() -> Any:
    try:
        from diffusers import training_utils
    except (ImportError, AttributeError, RuntimeError) as error:  # diffusers 0.31 under transformers 4.30 cannot
        pytest.skip(f"diffusers.training_utils does not import with this transformers ({error})")
    return training_utils


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_flow_loss_weights_match_diffusers(scheme: str) -> None:
    training_utils = _diffusers_training_utils()
    sigmas = torch.tensor([0.05, 0.3, 0.5, 0.77, 0.999])
    expected = training_utils.compute_loss_weighting_for_sd3(scheme, sigmas)
    torch.testing.assert_close(loss.flow_loss_weights(sigmas, scheme), expected.float().expand(5))


@pytest.mark.parametrize(("sampling", "options"), [("logit_normal", {"logit_mean": 0.5, "logit_std": 0.7}),
                                                   ("mode", {"mode_scale": 1.29}), ("uniform", {})])
def test_flow_timestep_densities_match_diffusers(sampling: str, options: dict[str, float]) -> None:
    """Same density as diffusers' sampler (which draws from the global generator): quantiles agree."""
    training_utils = _diffusers_training_utils()
    full = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, **options}
    torch.manual_seed(0)
    theirs = training_utils.compute_density_for_timestep_sampling(sampling, 20000, **full)
    generator = torch.Generator().manual_seed(1)
    ours = torch.tensor([noise.flow_timestep(generator, sampling, full["logit_mean"], full["logit_std"],
                                             full["mode_scale"]) for _ in range(20000)])
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    torch.testing.assert_close(torch.quantile(ours, quantiles), torch.quantile(theirs.float(), quantiles),
                               atol=0.02, rtol=0)


def test_flow_shift_is_the_schedulers() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    shifted = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas
    plain = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas
    ours = torch.tensor([noise.shift_timestep(float(t), 3.0) for t in plain])
    torch.testing.assert_close(ours, shifted.float(), atol=1e-6, rtol=0)


def test_flow_noise_is_per_sample_and_shifted() -> None:
    config = SimpleNamespace(flow_timestep_sampling="uniform", flow_logit_mean=0.0, flow_logit_std=1.0,
                             flow_mode_scale=1.29, flow_shift=1.0, offset_noise=0.0, pyramid_noise_iterations=0,
                             pyramid_noise_discount=0.3, input_perturbation=0.0)
    alone = noise.flow_batch_noise((4, 2, 2), [7], 3, config)
    together = noise.flow_batch_noise((4, 2, 2), [5, 7], 3, config)
    torch.testing.assert_close(together[0][1], alone[0][0])
    assert float(together[2][1]) == float(alone[2][0])
    shifted = noise.flow_batch_noise((4, 2, 2), [7], 3, SimpleNamespace(**{**vars(config), "flow_shift": 3.0}))
    assert float(shifted[2][0]) == pytest.approx(noise.shift_timestep(float(alone[2][0]), 3.0))
    assert float(shifted[2][0]) > float(alone[2][0])
