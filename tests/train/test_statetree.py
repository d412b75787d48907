"""Training state as tensors plus JSON: any nested state survives a file round trip exactly, and every
optimizer, LR schedule, EMA and GradScaler state this project trains with resumes to the same next step."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dreambooth.config.schema import SCHEDULERS, TrainingConfig
from dreambooth.train import snapshots, statetree
from dreambooth.train.ema import EMA
from dreambooth.train.optim import build_optimizer, set_training_mode
from dreambooth.train.schedulers import build_scheduler


def _files_round_trip(tree: Any, folder: Path) -> Any:
    """Through the very files a snapshot writes: safetensors for tensors, JSON text for the rest."""
    path = snapshots.write_snapshot(folder, 1, {}, {"tree": tree}, {"run_id": "r"})
    return snapshots.read_snapshot(path)[1]["tree"]


def assert_same(expected: Any, actual: Any, where: str = "state") -> None:
    """Equal values of equal types all the way down (tuple is not list, 1 is not '1', -0.0 is not 0.0)."""
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), where
        assert [type(k) for k in actual] == [type(k) for k in expected], where
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, b) in enumerate(zip(expected, actual, strict=True)):
            assert_same(a, b, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert _layout(actual) == _layout(expected), f"{where}: layout {actual.stride()} != {expected.stride()}"
        assert torch.equal(actual, expected), where
    elif isinstance(expected, float):
        assert (math.isnan(expected) and math.isnan(actual)) or (
            actual == expected and math.copysign(1, actual) == math.copysign(1, expected)), where
    else:
        assert actual == expected, where


def _layout(tensor: torch.Tensor) -> list[int]:
    """The strides that matter (a dimension of size 0 or 1 may have any stride)."""
    return [] if tensor.numel() == 0 else [s for s, n in zip(tensor.stride(), tensor.shape, strict=True) if n > 1]


DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool)
tensors = st.builds(lambda shape, dtype, seed: (torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                                                * 10).to(dtype),
                    st.lists(st.integers(0, 3), max_size=3), st.sampled_from(DTYPES), st.integers(0, 1000))
leaves = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
          | st.text(max_size=8) | tensors)
trees = st.recursive(leaves, lambda inner: (
    st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
    | st.dictionaries(st.integers(-5, 5) | st.text(max_size=4), inner, max_size=4)), max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(trees)
def test_any_nested_state_survives_flatten_and_unflatten(tree: Any) -> None:
    flat, structure = statetree.flatten(tree)
    assert_same(tree, statetree.unflatten(flat, json.loads(json.dumps(structure))))


@settings(max_examples=25, deadline=None)
@given(tree=trees)
def test_any_nested_state_survives_the_snapshot_files(tree: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    assert_same(tree, _files_round_trip(tree, tmp_path_factory.mktemp("tree")))


def test_int_and_str_keys_tuples_and_shared_tensors_stay_distinct(tmp_path: Path) -> None:
    shared = torch.arange(4.0)
    tree = {0: "int key", "0": "str key", "pair": (1, [2, (3,)]), "a": shared, "b": shared,
            "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)}
    back = _files_round_trip(tree, tmp_path)
    assert_same(tree, back)
    assert back["a"] is back["b"]  # one tensor in, one tensor out, as pickle would keep it


def test_values_that_json_and_tensors_cannot_hold_are_refused_by_name() -> None:
    with pytest.raises(statetree.StateFormatError, match=r"state\.opt\.fn: a function"):
        statetree.flatten({"opt": {"fn": lambda: None}})
    with pytest.raises(statetree.StateFormatError, match="dict key"):
        statetree.flatten({(1, 2): 3})
    with pytest.raises(statetree.StateFormatError, match="not a stored value"):
        statetree.unflatten({}, {"__reduce__": ["os.system", "echo"]})


# --- every optimizer, schedule, EMA and scaler of the project ----------------------------------------

OPTIMIZERS = ["adamw", "lion", "prodigy", "adafactor", "adamw_schedulefree"]


def _config(**overrides: Any) -> TrainingConfig:
    config = TrainingConfig(learning_rate=1e-2, lr_warmup_steps=2, lr_scheduler="cosine", lr_cycles=2)
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def _model(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 4, 2, 2, generator=generator).to(memory_format=torch.channels_last)),
            torch.nn.Parameter(torch.randn(6, generator=generator))]


def _build(config: TrainingConfig) -> tuple[list[torch.nn.Parameter], Any, Any, EMA]:
    params = _model(0)
    try:
        optimizer = build_optimizer(config, [{"params": params, "name": "unet", "lr": config.learning_rate,
                                              "weight_decay": 0.01}])
    except Exception as error:  # bitsandbytes' Lion may have no CPU kernel in this environment
        pytest.skip(f"{config.optimizer} cannot be built here: {error}")
    set_training_mode(optimizer, True)  # as the trainer does: schedule-free steps only in train mode
    return params, optimizer, build_scheduler(optimizer, config, 20), EMA(params, 0.9)


def _train(params: list[torch.nn.Parameter], optimizer: Any, scheduler: Any, ema: EMA, steps: range) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(memory_format=torch.preserve_format)
        optimizer.step()
        scheduler.step()
        ema.step(step + 1)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_resumes_to_the_same_next_steps(optimizer: str, tmp_path: Path) -> None:
    config = _config(optimizer=optimizer)
    straight = _build(config)
    _train(*straight, range(5))
    first = _build(config)
    _train(*first, range(3))
    objects = {"optimizer": first[1].state_dict(), "scheduler": first[2].state_dict(), "ema": first[3].state_dict()}
    path = snapshots.write_snapshot(tmp_path, 3, {"p0": first[0][0], "p1": first[0][1]}, objects, {"run_id": "r"})
    trained, loaded, _ = snapshots.read_snapshot(path)
    assert_same(objects, loaded)
    resumed = _build(config)
    with torch.no_grad():
        for index, param in enumerate(resumed[0]):
            param.copy_(trained[f"p{index}"])
    resumed[1].load_state_dict(loaded["optimizer"])
    resumed[2].load_state_dict(loaded["scheduler"])
    resumed[3].load_state_dict(loaded["ema"])
    _train(*resumed, range(3, 5))
    for expected, actual in zip(straight[0] + straight[3].shadow, resumed[0] + resumed[3].shadow, strict=True):
        assert torch.equal(expected, actual)


@pytest.mark.parametrize("schedule", SCHEDULERS)
def test_each_lr_schedule_state_round_trips(schedule: str, tmp_path: Path) -> None:
    config = _config(lr_scheduler=schedule)
    params, optimizer, scheduler, ema = _build(config)
    _train(params, optimizer, scheduler, ema, range(4))
    state = scheduler.state_dict()
    assert_same(state, _files_round_trip(state, tmp_path))


def _draws() -> tuple[torch.Tensor, float, float]:
    return torch.rand(3), random.random(), float(np.random.rand())


def test_grad_scaler_and_rng_states_round_trip(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    np.random.randn()  # a cached Gaussian is part of numpy's state
    back = _files_round_trip({"scaler": scaler.state_dict(), "rng": snapshots.rng_state()}, tmp_path)
    assert_same(scaler.state_dict(), back["scaler"])
    expected = _draws()
    snapshots.set_rng_state(back["rng"])
    actual = _draws()
    assert torch.equal(expected[0], actual[0]) and expected[1:] == actual[1:]


def test_ema_state_lands_on_its_parameters_device_in_float32() -> None:
    params = [torch.nn.Parameter(torch.ones(2))]
    ema = EMA(params, 0.5)
    ema.load_state_dict({"shadow": [torch.full((2,), 3.0, dtype=torch.float16)], "decay": 0.5})
    assert ema.shadow[0].dtype == torch.float32 and ema.shadow[0].device == params[0].device
    assert torch.equal(ema.shadow[0], torch.full((2,), 3.0))
