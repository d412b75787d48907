"""Slow: one LoRA step of SD 3.5 Medium at real size (random weights, bf16, 256 px, no T5) through the Trainer.

Catches what the tiny model cannot: the real transformer's LoRA targets (dual attention in the first 13 blocks,
q/k norms), the real CLIP-L/CLIP-G widths meeting T5's, and an export of the real layout. Needs about 9 GiB of
free memory (the transformer alone is 4.5 GiB in bf16) and native bf16 arithmetic (a GPU, or a CPU with AVX512-BF16
or AMX): on an AVX2 CPU torch emulates bf16 matrix products and the step takes hours (measured: unfinished after
25 minutes on this project's 2-core machine), while fp32 would need about 15 GiB. Skipped otherwise. Run with
`pytest --runslow tests/train/test_sd3_real_architecture.py`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

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
NEEDED_GIB = 9.0


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def real_sd35_medium() -> Any:
    """SD 3.5 Medium's transformer, VAE and CLIP encoders built from the shipped configs in bf16, random weights."""
    import diffusers
    import transformers

    from dreambooth.families import get_family
    from dreambooth.models.components import Components
    from dreambooth.models.tokenizer import load_clip_tokenizer

    family = get_family("sd3")
    configs = family.shipped_configs()
    with default_dtype(torch.bfloat16), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        denoiser = diffusers.SD3Transformer2DModel.from_config(family.variant_configs()["sd3.5-medium"])
        vae = diffusers.AutoencoderKL.from_config(configs["vae"])
        encoders = [transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig.from_dict(configs[name]))
                    for name in ("text_encoder", "text_encoder_2")]
    tokenizers = [load_clip_tokenizer(spec.pad_token) for spec in family.text_encoders[:2]]
    return Components(family="sd3", denoiser=denoiser, vae=vae, text_encoders=[*encoders, None],
                      tokenizers=[*tokenizers, None], noise_scheduler=family.make_noise_scheduler(),
                      prediction_type="flow_matching")


def _images(folder: Path, count: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"img{index}.png")
    return str(folder)


def native_bf16() -> bool:
    return torch.cuda.is_available() or torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")


def test_one_lora_step_of_sd35_medium(tmp_path: Path) -> None:
    if not native_bf16():
        pytest.skip(f"bf16 is emulated on this CPU ({torch.backends.cpu.get_cpu_capability()}): one step takes hours")
    if not torch.cuda.is_available() and available_gib() < NEEDED_GIB:
        pytest.skip(f"needs {NEEDED_GIB} GiB of free memory, {available_gib():.1f} GiB available")
    started = time.monotonic()
    components = real_sd35_medium()
    built = time.monotonic()
    layout = Layout.under(tmp_path / "models").ensure()
    model = ModelStore(layout).model("sd35m")
    model.working.mkdir(parents=True)
    concept = Concept(instance_data_dir=_images(tmp_path / "inst", 1), instance_prompt="photo of sks dog",
                      n_samples=0)
    config = TrainingConfig(model_name="sd35m", model_family="sd3", prediction_type="flow_matching",
                            sample_scheduler="euler", method="lora", lora_rank=4, lora_alpha=4.0,
                            train_text_encoder=False, resolution=256, enable_bucketing=False, max_train_steps=1,
                            train_batch_size=1, mixed_precision="bf16", gradient_checkpointing=True,
                            with_prior_preservation=False, save_precision="bf16", concepts=[concept])
    model.save_config(config)
    with mock.patch("dreambooth.models.components.load_components", lambda *args, **kwargs: components):
        result = Trainer(config, FakeHost(layout), resume=False).run()
    assert result.completed and result.step == 1
    with safe_open(str(result.saved[0]), framework="pt") as handle:
        keys = set(handle.keys())
    assert "lora_unet_joint_blocks_12_x_block_attn2_qkv.lora_down.weight" in keys  # the last dual-attention block
    assert "lora_unet_joint_blocks_23_context_block_attn_qkv.lora_up.weight" in keys
    print(f"\nSD 3.5 Medium: built in {built - started:.0f} s, one LoRA step and export in "
          f"{time.monotonic() - built:.0f} s")
