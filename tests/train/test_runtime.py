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
    modules = (components.denoiser, components.vae, *components.text_encoders)  # type: ignore[attr-defined]
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
    params = list(components.denoiser.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    runtime.own_memory(components)
    assert list(components.denoiser.parameters()) == params
    first = params[0]
    first.grad = torch.ones_like(first)
    value = first.detach().clone()
    optimizer.step()
    assert torch.allclose(first.detach(), value - 0.1)
    assert runtime.own_memory(components) == 0  # nothing left to move


FAULTS_SCRIPT = """
import json, resource, torch
from dreambooth.train import runtime

def step_faults():
    # One training-step-like round: four 48 MiB tensors (glibc maps anything over 32 MiB on its own), filled, freed.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(48 * 2**18) for _ in range(4)]  # float32: 2**18 elements per MiB
    for tensor in tensors:
        tensor.fill_(1.0)
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20

counts = {"default": [step_faults() for _ in range(3)]}
with runtime.reuse_freed_memory(enabled=True) as active:
    counts["reused"] = [step_faults() for _ in range(6)]
    counts["rss_inside"] = rss_mib()
counts["active"] = active
counts["rss_after"] = rss_mib()
print(json.dumps(counts))
"""


@pytest.mark.skipif(runtime.glibc() is None, reason="glibc's malloc only")
def test_freed_memory_is_reused_while_training_and_returned_afterwards() -> None:
    """In a fresh process (malloc's state depends on what ran before): by default every step faults in all
    its big tensors' pages anew; while freed memory is reused, steps after the first few fault in few or none
    (how fast the heap settles depends on small allocations in between); afterwards the kept memory is
    returned. That malloc's options come back is checked exactly with a recording stand-in below."""
    import json
    import subprocess

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], cwd=root, capture_output=True, text=True,
                          check=True)
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    pages = 4 * 48 * 2**20 // 4096
    assert counts["active"] is True
    assert min(counts["default"]) > pages // 2
    assert max(counts["reused"][-2:]) < pages // 2  # mostly reused once the heap has grown (often fully)
    assert counts["rss_inside"] - counts["rss_after"] > 96  # the kept memory went back to the system


class RecordingLibc:
    """Stands in for glibc: records mallopt and malloc_trim calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append(("mallopt", option, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad, 0))
        return 1


def test_training_on_cpu_frees_gradients_between_steps_and_restores_malloc(env: object) -> None:
    from unittest import mock

    from dreambooth.train.events import TrainCallbacks

    seen: list[tuple[bool, bool, int]] = []
    libc = RecordingLibc()

    class Watch(TrainCallbacks):
        def on_progress(self, progress: object) -> None:
            grads = [p.grad for p in trainer.session.params]
            seen.append((trainer.heap_reuse, all(g is None for g in grads), len(libc.calls)))

    trainer = env.trainer(Watch(), max_train_steps=2)  # type: ignore[attr-defined]
    with mock.patch.object(runtime, "glibc", return_value=libc):
        trainer.run()
    assert seen == [(True, True, 2), (True, True, 2)]  # reuse switched on before the steps, gradients freed
    assert libc.calls == [("mallopt", runtime.M_MMAP_MAX, 0), ("mallopt", runtime.M_TRIM_THRESHOLD, 2**31 - 1),
                          ("mallopt", runtime.M_TRIM_THRESHOLD, 128 * 1024), ("mallopt", runtime.M_MMAP_MAX, 65536),
                          ("malloc_trim", 0, 0)]


def test_without_heap_reuse_gradients_stay_allocated(env: object) -> None:
    from unittest import mock

    from dreambooth.train.events import TrainCallbacks

    kept: list[bool] = []

    class Watch(TrainCallbacks):
        def on_progress(self, progress: object) -> None:
            kept.append(all(p.grad is not None for p in trainer.session.params))

    trainer = env.trainer(Watch(), max_train_steps=2)  # type: ignore[attr-defined]
    with mock.patch.object(runtime, "glibc", return_value=None):
        trainer.run()
    assert kept == [True, True] and trainer.heap_reuse is False


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
    session, _ = env.trainer(**settings).setup()  # type: ignore[attr-defined]
    loaded = {"unet": session.components.denoiser, "vae": session.components.vae,
              "text_encoder": session.components.text_encoders[0]}
    for name, module in loaded.items():
        trained = {id(p) for params in session.trainable.values() for p in params}
        frozen = [p.dtype for p in module.parameters() if id(p) not in trained]
        assert set(frozen) <= {expected[name]}, name
    assert all(p.dtype == torch.float32 for p in session.params)


def test_fp16_keeps_the_vae_in_fp32_at_load(env: object) -> None:
    dtypes = runtime.load_dtypes(env.configured(method="lora", mixed_precision="fp16"))  # type: ignore[attr-defined]
    assert (dtypes["unet"], dtypes["vae"]) == (torch.float16, torch.float32)
