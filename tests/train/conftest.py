"""Fixtures for trainer tests: a tiny SD1 model in a temporary store, 64 px images, a fake host."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.config.schema import Concept, TrainingConfig
from dreambooth.store import Layout, ModelStore

from fake_host import FakeHost


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Any:
    """Tiny models run fastest on one intra-op thread: thread start-up and spinning cost more than the
    parallel work saves, and a busy CI machine makes spinning threads many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_working(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A saved working/ folder of the tiny model of a family, built once per session."""
    from dreambooth.models.components import save_components
    from dreambooth.models.tiny import tiny_components

    built: dict[str, Path] = {}

    def get(family: str = "sd1") -> Path:
        if family not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{family}") / "working"
            save_components(tiny_components(family, seed=0), folder)
            built[family] = folder
        return built[family]

    return get


def write_images(folder: Path, count: int, seed: int, size: int = 64, caption: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        if caption is not None:
            (folder / f"img{index}.txt").write_text(f"{caption} {index}")
    return folder


def base_config(name: str, root: Path, **overrides: Any) -> TrainingConfig:
    concept = Concept(instance_data_dir=str(write_images(root / "inst", 2, 1)), instance_prompt="photo of sks dog",
                      instance_token="sks", class_token="dog", class_prompt="photo of a dog",
                      class_data_dir=str(write_images(root / "cls", 2, 2)), num_class_images=2, n_samples=0)
    config = TrainingConfig(model_name=name, resolution=64, enable_bucketing=False, bucket_min_resolution=64,
                            max_train_steps=2, train_batch_size=1, learning_rate=1e-3, text_encoder_lr=1e-3,
                            text_encoder_2_lr=1e-3, lr_scheduler="constant", mixed_precision="no",
                            cache_latents="memory", save_precision="fp32", seed=7, concepts=[concept])
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


class Env:
    """A temporary models folder with one tiny model; `trainer(**overrides)` builds a Trainer."""

    def __init__(self, root: Path, working: Path, family: str = "sd1"):
        self.root = root
        self.layout = Layout.under(root / "models").ensure()
        self.base_working = working
        self.model = ModelStore(self.layout).model("tiny")
        shutil.copytree(working, self.model.working)
        self.config = base_config("tiny", root, model_family=family)
        self.model.save_config(self.config)
        self.host = FakeHost(self.layout)

    def configured(self, **overrides: Any) -> TrainingConfig:
        import copy

        config = copy.deepcopy(self.config)
        for key, value in overrides.items():
            setattr(config, key, value)
        return config

    def trainer(self, callbacks: Any = None, commands: Any = None, resume: bool = True, observers: Any = (),
                **overrides: Any) -> Any:
        from dreambooth.train.trainer import Trainer

        return Trainer(self.configured(**overrides), self.host, callbacks, commands, resume=resume,
                       observers=observers)

    def fresh(self) -> None:
        """Forget earlier runs: base weights back in working/, no snapshots, samples, logs or exports."""
        shutil.rmtree(self.model.working)
        shutil.copytree(self.base_working, self.model.working)
        for folder in (self.model.snapshots, self.model.samples, self.model.logging, self.layout.lora_dir,
                       self.layout.checkpoints_dir):
            shutil.rmtree(folder, ignore_errors=True)
        self.layout.ensure()


@pytest.fixture
def make_config() -> Callable[..., TrainingConfig]:
    """`base_config` for tests that set up their own model folder (several test folders hold a conftest module,
    so it cannot be imported by name)."""
    return base_config


@pytest.fixture
def env(tmp_path: Path, tiny_working: Callable[[str], Path]) -> Env:
    torch.manual_seed(0)
    return Env(tmp_path, tiny_working("sd1"))


@pytest.fixture
def sdxl_env(tmp_path: Path, tiny_working: Callable[[str], Path]) -> Env:
    torch.manual_seed(0)
    return Env(tmp_path, tiny_working("sdxl"), family="sdxl")


@pytest.fixture
def sdxlv_env(tmp_path: Path, tiny_working: Callable[[str], Path]) -> Env:
    """The tiny SDXL v-prediction model, configured as creating it from a NoobAI-XL V-Pred file does."""
    from dreambooth.families import get_family

    torch.manual_seed(0)
    env = Env(tmp_path, tiny_working("sdxlv"), family="sdxlv")
    defaults = get_family("sdxlv").config_defaults()
    env.config.prediction_type, env.config.zero_terminal_snr = defaults["prediction_type"], defaults["zero_terminal_snr"]
    env.model.save_config(env.config)
    return env


@pytest.fixture
def sd3_env(tmp_path: Path, tiny_working: Callable[[str], Path]) -> Env:
    torch.manual_seed(0)
    environment = Env(tmp_path, tiny_working("sd3"), family="sd3")
    environment.config.prediction_type = "flow_matching"
    environment.config.sample_scheduler = "euler"
    environment.model.save_config(environment.config)
    return environment
