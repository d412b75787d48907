"""LR schedules, LR scaling, optimizers and EMA."""

from __future__ import annotations

import math

import pytest
import torch

from dreambooth.config.schema import OPTIMIZERS, SCHEDULERS, TrainingConfig
from dreambooth.errors import ConfigError
from dreambooth.train import optim, schedulers
from dreambooth.train.ema import EMA


def _config(**values: object) -> TrainingConfig:
    config = TrainingConfig()
    for key, value in values.items():
        setattr(config, key, value)
    return config


def test_every_scheduler_has_its_shape() -> None:
    curves = {kind: schedulers.lr_curve(_config(lr_scheduler=kind, lr_warmup_steps=10), 100) for kind in SCHEDULERS}
    assert curves["constant"] == [1.0] * 100
    assert curves["constant_with_warmup"][0] < 0.1 and curves["constant_with_warmup"][50] == 1.0
    assert curves["linear"][55] == pytest.approx(0.5, abs=0.02)
    assert curves["cosine"][55] == pytest.approx(0.5, abs=0.02)
    assert curves["rex"][55] > curves["linear"][55]  # slow first
    # with 1 cycle and power 1, cosine_with_restarts and polynomial equal cosine and linear
    assert len({tuple(c) for c in curves.values()}) == len(SCHEDULERS) - 2


def test_cosine_restarts_polynomial_and_decay_past_end() -> None:
    restarts = schedulers.lr_curve(_config(lr_scheduler="cosine_with_restarts", lr_cycles=2), 100)
    assert restarts[49] < 0.01 and restarts[50] == pytest.approx(1.0)
    squared = schedulers.lr_curve(_config(lr_scheduler="polynomial", lr_power=2.0), 100)
    assert squared[50] == pytest.approx(0.25)
    longer = schedulers.lr_curve(_config(lr_scheduler="cosine", lr_decay_past_end=1.25), 100)
    assert longer[-1] > 0.05  # decays over 125 steps: the last step still learns


def test_warmup_minus_one_is_two_percent_of_decay_steps() -> None:
    shape = schedulers.shape_for(_config(lr_scheduler="cosine", lr_warmup_steps=-1, lr_decay_past_end=1.0), 500)
    assert shape.warmup_steps == 10


def test_scale_lr() -> None:
    assert schedulers.lr_scale(_config(scale_lr="none", train_batch_size=4)) == 1.0
    assert schedulers.lr_scale(_config(scale_lr="linear", train_batch_size=4, gradient_accumulation_steps=2)) == 8
    assert schedulers.lr_scale(_config(scale_lr="sqrt", train_batch_size=4)) == pytest.approx(4**0.55)
    assert schedulers.lr_scale(_config(scale_lr="linear"), world_size=2) == 2


def _groups(config: TrainingConfig) -> list[dict[str, object]]:
    unet = [torch.nn.Parameter(torch.randn(64, 64))]
    text = [torch.nn.Parameter(torch.randn(64, 64))]
    return optim.param_groups(config, {"unet": unet, "text_encoder": text})


def test_param_groups_have_their_own_lr_and_weight_decay() -> None:
    groups = _groups(_config(learning_rate=1e-4, text_encoder_lr=3e-5, weight_decay=0.1,
                             text_encoder_weight_decay=0.0))
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("unet", 1e-4, 0.1),
                                                                         ("text_encoder", 3e-5, 0.0)]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps_on_cpu(name: str) -> None:
    config = _config(optimizer=name, learning_rate=1e-2, text_encoder_lr=1e-2)
    groups = _groups(config)
    before = [g["params"][0].detach().clone() for g in groups]  # type: ignore[index]
    optimizer = optim.build_optimizer(config, groups)
    optim.set_training_mode(optimizer, True)
    for group in groups:
        group["params"][0].grad = torch.randn(64, 64)  # type: ignore[index]
    optimizer.step()
    optim.set_training_mode(optimizer, False)
    for group, old in zip(groups, before, strict=True):
        assert not torch.equal(group["params"][0], old)  # type: ignore[index]


def test_unknown_optimizer_and_nothing_to_train_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="optimizer"):
        optim.build_optimizer(_config(optimizer="sgd"), _groups(_config()))
    with pytest.raises(ConfigError, match="train_unet"):
        optim.build_optimizer(_config(), [])


def test_missing_optimizer_package_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # makes the import fail
    with pytest.raises(ConfigError, match="'optimizer'.*prodigyopt"):
        optim.build_optimizer(_config(optimizer="prodigy"), _groups(_config()))


def test_ema_averages_and_applies_temporarily() -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([param], decay=0.5, update_every=2)
    with torch.no_grad():
        param.fill_(1.0)
    ema.step(1)  # not an update step
    assert torch.equal(ema.shadow[0], torch.zeros(3))
    ema.step(2)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.5))
    with ema.applied():
        assert torch.allclose(param, torch.full((3,), 0.5))
    assert torch.equal(param.detach(), torch.ones(3))
    restored = EMA([param], decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.shadow[0], ema.shadow[0])
    assert math.isclose(ema.decay, 0.5)
