"""What you train is what you get: the exported single file renders what the trainer's own pipeline renders."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from spies import SessionSpy

from dreambooth.generation import GenerationRequest
from dreambooth.models.components import build_pipeline
from dreambooth.models.loading import components_from_state_dict, read_checkpoint
from dreambooth.models.tiny import tiny_configs
from dreambooth.train.sampling import render


def psnr(a: Any, b: Any) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_exported_checkpoint_renders_like_the_trainer(env: Any) -> None:
    spy = SessionSpy()
    trainer = env.trainer(max_train_steps=2, learning_rate=5e-3, text_encoder_lr=5e-3, observers=[spy])
    result = trainer.run()
    exported = env.layout.checkpoints_dir / "tiny_2.safetensors"
    assert exported in result.saved
    prompt = GenerationRequest("photo of sks dog", seed=3, steps=4, cfg_scale=5.0, width=64, height=64)
    with torch.no_grad():
        trained = render(build_pipeline(spy.session.components, "ddim"), prompt, torch.device("cpu"))
        # the single file read fresh, with the tiny model's configs (real models use the shipped ones)
        state, _ = read_checkpoint(exported)
        fresh = components_from_state_dict(state, "sd1", "epsilon", tiny_configs("sd1"), torch.float32)
        reloaded = render(build_pipeline(fresh, "ddim"), prompt, torch.device("cpu"))
    assert psnr(trained, reloaded) >= 40.0
