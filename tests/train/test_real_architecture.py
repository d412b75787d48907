"""Slow: LoRA and DreamBooth training on the real SD1.5 architecture (random weights, 64 px, 2 steps).

Catches what the tiny models cannot: the real layer names and shapes behind LoRA targets and export keys, and
the full UNet's save path. Run with `pytest --runslow tests/train/test_real_architecture.py` (minutes, about
10 GB of memory for the DreamBooth run).
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dreambooth.config.schema import Concept, TrainingConfig
from dreambooth.store import Layout, ModelStore
from dreambooth.train.trainer import Trainer

from fake_host import FakeHost

pytestmark = pytest.mark.slow


def _images(folder: Path, count: int, seed: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"img{index}.png")
    return str(folder)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, Path]:
    """A models folder with a real-architecture SD1.5 model (random weights) saved once."""
    from dreambooth.families import get_family
    from dreambooth.models.components import Components, make_noise_scheduler, save_components
    from dreambooth.models.loading import shipped_configs
    from dreambooth.models.tiny import build_models
    from dreambooth.models.tokenizer import load_clip_tokenizer

    root = tmp_path_factory.mktemp("sd15")
    layout = Layout.under(root / "models").ensure()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet, vae, encoders = build_models(shipped_configs("sd1"))
    scheduler = make_noise_scheduler("sd1")
    components = Components(family="sd1", denoiser=unet, vae=vae, text_encoders=encoders,
                            tokenizers=[load_clip_tokenizer(pad) for pad in get_family("sd1").pad_tokens],
                            noise_scheduler=scheduler, prediction_type=scheduler.config.prediction_type)
    working = root / "base-working"
    save_components(components, working)
    del components, unet, vae, encoders
    gc.collect()
    return layout, working


def _train(layout: Layout, base_working: Path, name: str, **settings: object) -> tuple[Trainer, object]:
    import shutil

    model = ModelStore(layout).model(name)
    shutil.copytree(base_working, model.working)
    root = layout.models_dir.parent
    concept = Concept(instance_data_dir=_images(root / "inst", 2, 1), instance_prompt="photo of sks dog",
                      class_prompt="photo of a dog", class_data_dir=_images(root / "cls", 2, 2),
                      num_class_images=2, n_samples=0)
    config = TrainingConfig(model_name=name, resolution=64, enable_bucketing=False, max_train_steps=2,
                            train_batch_size=1, mixed_precision="no", seed=3, save_precision="fp16",
                            concepts=[concept], **settings)
    model.save_config(config)
    trainer = Trainer(config, FakeHost(layout), resume=False)
    return trainer, trainer.run()


def _keys(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as handle:
        return set(handle.keys())


def test_lora_on_the_real_sd15_architecture(sd15: tuple[Layout, Path]) -> None:
    layout, base = sd15
    trainer, result = _train(layout, base, "real-lora", method="lora", lora_rank=4, lora_alpha=4.0,
                             learning_rate=1e-3, text_encoder_lr=1e-4)
    assert result.completed and result.step == 2 and result.loss == result.loss
    lora_file = result.saved[0]
    keys = _keys(lora_file)
    # SD1.5: 16 transformer blocks x (2 x q, k, v, out + 2 feed-forward + proj_in, proj_out); 12 CLIP layers x 6
    assert sum(k.startswith("lora_te_") and k.endswith(".alpha") for k in keys) == 12 * 6
    assert sum(k.startswith("lora_unet_") and k.endswith(".alpha") for k in keys) == 16 * 12
    trained_up = [name for name, param in trainer.session.components.denoiser.named_parameters()
                  if "lora_B" in name and float(param.detach().abs().max()) > 0]
    assert trained_up, "the UNet LoRA did not train"
    del trainer
    gc.collect()


def test_dreambooth_on_the_real_sd15_architecture(sd15: tuple[Layout, Path]) -> None:
    from safetensors.torch import load_file

    layout, base = sd15
    before = load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    probe = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    reference = before[probe].clone()
    del before
    gc.collect()
    # Adafactor keeps the optimizer state small: the full UNet, its gradients and the saves fit in ~10 GB.
    trainer, result = _train(layout, base, "real-db", method="dreambooth", optimizer="adafactor",
                             train_text_encoder=False, learning_rate=1e-4)
    del trainer
    gc.collect()
    assert result.completed and result.step == 2
    working = ModelStore(layout).existing("real-db").working
    after = load_file(str(working / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(after[probe], reference)
    exported = layout.checkpoints_dir / "real-db_2.safetensors"
    assert exported in result.saved
    keys = _keys(exported)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert any(k.startswith("cond_stage_model.transformer.") for k in keys)
