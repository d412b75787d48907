"""EmbeddedHost: checkpoints listing, diffusers generation over a tiny model, caching, lock, interrupt."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from dreambooth.errors import ModelError
from dreambooth.host.base import GenerationRequest, Host
from dreambooth.host.embedded import EmbeddedHost, find_checkpoints
from dreambooth.store import Layout


@pytest.fixture
def host(tmp_path: Path) -> EmbeddedHost:
    return EmbeddedHost(Layout.under(tmp_path / "models").ensure(), device="cpu")


def request(model_dir: Path, **changes) -> GenerationRequest:
    values = dict(prompt="a dog", seed=5, steps=1, width=32, height=32, count=1, batch_size=1, model_dir=model_dir)
    values.update(changes)
    return GenerationRequest(**values)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def test_is_a_host(host):
    assert isinstance(host, Host)


def test_lists_checkpoints_recursively_without_vaes(host):
    folder = host.layout.checkpoints_dir
    for name in ("b.safetensors", "a.ckpt", "sub/c.safetensors", "x.vae.safetensors", "notes.txt"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"0")
    assert [p.relative_to(folder).as_posix() for p in host.list_checkpoints()] == [
        "a.ckpt", "b.safetensors", "sub/c.safetensors"]
    assert find_checkpoints(folder / "missing") == []


def test_generates_count_images_with_consecutive_seeds(host, tiny_model_dir):
    batch = host.generate(request(tiny_model_dir, count=3, batch_size=2))
    assert [image.size for image in batch] == [(32, 32)] * 3
    alone = host.generate(request(tiny_model_dir, seed=6))[0]
    # image 1 of the batch used seed 5 + 1 = 6: the same picture as seed 6 alone (batching adds rounding only)
    assert np.abs(pixels(batch[1]) - pixels(alone)).max() <= 2
    assert np.abs(pixels(batch[0]) - pixels(alone)).max() > 2


def test_pipeline_is_cached_and_freed_by_release(tmp_path, tiny_model_dir):
    loaded: list[Path] = []
    host = EmbeddedHost(Layout.under(tmp_path / "models"), device="cpu",
                        folder_loader=lambda folder: loaded.append(folder) or object())
    first = host.pipeline(request(tiny_model_dir))
    assert host.pipeline(request(tiny_model_dir)) is first and loaded == [tiny_model_dir]
    host.release_model()
    assert host.pipeline(request(tiny_model_dir)) is not first and len(loaded) == 2


def test_checkpoint_requests_use_the_checkpoint_loader(tmp_path):
    loaded: list[Path] = []

    class Pipe:
        def __call__(self, **kwargs):
            from PIL import Image
            return type("Out", (), {"images": [Image.new("RGB", (kwargs["width"], kwargs["height"]))
                                               for _ in kwargs["prompt"]]})()

    def loader(path: Path) -> Pipe:
        loaded.append(path)
        return Pipe()

    host = EmbeddedHost(Layout.under(tmp_path / "models").ensure(), checkpoint_loader=loader, device="cpu")
    checkpoint = host.layout.checkpoints_dir / "base.safetensors"
    checkpoint.write_bytes(b"x")
    images = host.generate(GenerationRequest("p", count=2, width=8, height=8, checkpoint=checkpoint))
    assert len(images) == 2 and loaded == [checkpoint]
    host.generate(GenerationRequest("p", count=1, width=8, height=8, checkpoint=checkpoint))
    assert loaded == [checkpoint]  # cached
    checkpoint.write_bytes(b"changed!")  # a rewritten file is loaded again
    host.generate(GenerationRequest("p", count=1, width=8, height=8, checkpoint=checkpoint))
    assert len(loaded) == 2


def test_missing_models_give_clear_errors(host, tmp_path):
    with pytest.raises(ModelError, match="model_index.json"):
        host.generate(request(tmp_path))
    with pytest.raises(ModelError, match="does not exist"):
        host.generate(GenerationRequest("p", checkpoint=tmp_path / "nope.safetensors"))
    with pytest.raises(ModelError, match="neither"):
        host.generate(GenerationRequest("p"))




def test_gpu_lock_is_reentrant_and_exclusive(host):
    entered = threading.Event()
    with host.gpu_lock():
        with host.gpu_lock():  # the trainer samples while the service holds the lock
            pass

        def other() -> None:
            with host.gpu_lock():
                entered.set()

        thread = threading.Thread(target=other)
        thread.start()
        assert not entered.wait(0.2)
    thread.join(2)
    assert entered.is_set()


def test_generates_from_a_single_file_checkpoint(host, tiny_model_dir):
    from dreambooth.models.demo import write_demo_checkpoint

    checkpoint = write_demo_checkpoint("sd1", host.layout.checkpoints_dir / "tiny.safetensors", seed=0)
    images = host.generate(GenerationRequest("a dog", seed=5, steps=1, width=32, height=32, count=1,
                                             checkpoint=checkpoint))
    from_folder = host.generate(request(tiny_model_dir))
    assert images[0].size == (32, 32) and host.list_checkpoints() == [checkpoint]
    assert np.abs(pixels(images[0]) - pixels(from_folder[0])).max() <= 2  # same weights, same picture
