"""The loop's setup: weights leave the checkpoint's memory map, keeping their values."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dreambooth.models.components import load_components
from dreambooth.train import runtime

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def tensors(components: object) -> list[torch.Tensor]:
    modules = (components.unet, components.vae, *components.text_encoders)  # type: ignore[attr-defined]
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def in_file_map(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return any(low <= tensor.data_ptr() < high for low, high in ranges)


def mapped_files() -> set[str]:
    return {line.split(maxsplit=5)[5] for line in Path("/proc/self/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


def test_loaded_weights_start_in_the_file_map_and_own_memory_moves_them_out(
        tiny_working: Callable[[str], Path]) -> None:
    components = load_components(tiny_working("sd1"))
    before = {id(t): t.detach().clone() for t in tensors(components)}
    mapped_before = [t for t in tensors(components) if in_file_map(t, runtime.file_mapped_ranges())]
    assert mapped_before, "safetensors no longer memory-maps: own_memory has nothing to do"

    copied = runtime.own_memory(components)

    assert copied == sum(t.nelement() * t.element_size() for t in mapped_before)
    ranges = runtime.file_mapped_ranges()
    assert not [t for t in tensors(components) if in_file_map(t, ranges)]
    for tensor in tensors(components):
        assert torch.equal(tensor, before[id(tensor)])
    unet_file = str(tiny_working("sd1") / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet_file not in mapped_files()


def test_own_memory_keeps_parameters_and_optimizer_links(tiny_working: Callable[[str], Path]) -> None:
    components = load_components(tiny_working("sd1"))
    params = list(components.unet.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    runtime.own_memory(components)
    assert list(components.unet.parameters()) == params
    first = params[0]
    first.grad = torch.ones_like(first)
    value = first.detach().clone()
    optimizer.step()
    assert torch.allclose(first.detach(), value - 0.1)
    assert runtime.own_memory(components) == 0  # nothing left to move


def faults_to_fill(megabytes: int) -> int:
    """Minor page faults taken to allocate, fill and free a tensor of this size."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(megabytes * 2**18).fill_(1.0)  # float32: 2**18 elements per MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(runtime.glibc() is None, reason="glibc's malloc only")
def test_freed_memory_is_reused_while_training_and_returned_afterwards() -> None:
    pages = 64 * 2**20 // 4096
    assert faults_to_fill(64) > pages // 2  # default: a fresh mmap, every page faulted in anew
    with runtime.reuse_freed_memory(enabled=True) as active:
        assert active
        faults_to_fill(64)  # grows the heap once
        assert faults_to_fill(64) < pages // 10  # then reuses it
    assert faults_to_fill(64) > pages // 2  # defaults are back
    with runtime.reuse_freed_memory(enabled=False) as active:
        assert not active
        faults_to_fill(64)
        assert faults_to_fill(64) > pages // 2


@pytest.mark.skipif(runtime.glibc() is None, reason="glibc's malloc only")
def test_training_on_cpu_frees_gradients_between_steps_and_restores_malloc(env: object) -> None:
    from dreambooth.train.events import TrainCallbacks

    seen: list[tuple[bool, bool]] = []

    class Watch(TrainCallbacks):
        def on_progress(self, progress: object) -> None:
            grads = [p.grad for p in trainer.params]
            seen.append((trainer.heap_reuse, all(g is None for g in grads)))

    trainer = env.trainer(Watch(), max_train_steps=2)  # type: ignore[attr-defined]
    trainer.run()
    assert seen == [(True, True), (True, True)]
    assert faults_to_fill(64) > 64 * 2**20 // 4096 // 2  # malloc's defaults are back after the run


@pytest.mark.parametrize(("settings", "expected"), [
    ({"method": "lora", "mixed_precision": "bf16", "train_text_encoder": True},
     {"unet": torch.bfloat16, "vae": torch.bfloat16, "text_encoder": torch.bfloat16}),
    ({"method": "dreambooth", "mixed_precision": "bf16", "train_text_encoder": False},
     {"unet": torch.float32, "vae": torch.bfloat16, "text_encoder": torch.bfloat16}),
    ({"method": "finetune", "mixed_precision": "bf16", "train_unet": False, "train_text_encoder": True},
     {"unet": torch.bfloat16, "vae": torch.bfloat16, "text_encoder": torch.float32}),
    ({"method": "lora", "mixed_precision": "no"},
     {"unet": torch.float32, "vae": torch.float32, "text_encoder": torch.float32}),
])
def test_frozen_parts_load_in_the_compute_dtype_and_trained_parts_in_fp32(env: object, settings: dict[str, object],
                                                                       expected: dict[str, torch.dtype]) -> None:
    config = env.configured(**settings)  # type: ignore[attr-defined]
    dtypes = runtime.load_dtypes(config)
    assert {name: dtypes[name] for name in expected} == expected
    trainer = env.trainer(**settings)  # type: ignore[attr-defined]
    trainer.setup()
    loaded = {"unet": trainer.components.unet, "vae": trainer.components.vae,
              "text_encoder": trainer.components.text_encoders[0]}
    for name, module in loaded.items():
        trained = {id(p) for params in trainer.trainable.values() for p in params}
        frozen = [p.dtype for p in module.parameters() if id(p) not in trained]
        assert set(frozen) <= {expected[name]}, name
    assert all(p.dtype == torch.float32 for p in trainer.params)


def test_fp16_keeps_the_vae_in_fp32_at_load(env: object) -> None:
    dtypes = runtime.load_dtypes(env.configured(method="lora", mixed_precision="fp16"))  # type: ignore[attr-defined]
    assert (dtypes["unet"], dtypes["vae"]) == (torch.float16, torch.float32)
