"""The embedded default host: diffusers pipelines over local folders in the web UI's layout.

Used by the standalone app and the CLI. Nothing here imports a web UI; models load from local files only.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..generation import GenerationRequest
from ..store import Layout
from .base import NullHostMixin

log = logging.getLogger(__name__)

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")
VAE_SUFFIXES = (".vae.safetensors", ".vae.ckpt")  # VAE files beside checkpoints are no checkpoints

PipelineLoader = Callable[[Path], Any]


def is_checkpoint_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(CHECKPOINT_EXTENSIONS) and not name.endswith(VAE_SUFFIXES)


def find_checkpoints(*folders: Path) -> list[Path]:
    """Checkpoint files under the folders (recursively, as the web UI scans), sorted, without duplicates."""
    found: dict[Path, None] = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if is_checkpoint_file(path):
                    found.setdefault(path, None)
    return list(found)


def _pipeline_from_folder(model_dir: Path) -> Any:
    from ..models.components import build_pipeline, load_components

    return build_pipeline(load_components(model_dir))


def _pipeline_from_checkpoint(checkpoint: Path) -> Any:
    from ..models import loading
    from ..models.components import build_pipeline

    return build_pipeline(loading.load_checkpoint(checkpoint))


def _file_identity(path: Path) -> tuple[int, int]:
    """Changes when a folder or file is replaced (atomic renames give a new inode) or rewritten."""
    info = path.stat()
    return info.st_ino, info.st_mtime_ns


def _free_memory() -> None:
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class EmbeddedHost(NullHostMixin):
    """A Host over a Layout: draws with diffusers, holds a plain re-entrant lock as its GPU queue."""

    name = "embedded"

    def __init__(self, layout: Layout, folder_loader: PipelineLoader | None = None,
                 checkpoint_loader: PipelineLoader | None = None, device: str | None = None):
        self.layout = layout
        self._folder_loader = folder_loader or _pipeline_from_folder
        self._checkpoint_loader = checkpoint_loader or _pipeline_from_checkpoint
        self._device = device
        # Re-entrant: the service holds it for a whole run while the trainer samples through generate().
        self._gpu_lock = threading.RLock()
        self._cache_lock = threading.Lock()
        self._cache: dict[tuple[Any, ...], Any] = {}  # one pipeline at a time: memory is the constraint

    # --- folders and lists -------------------------------------------------------------------------
    def list_checkpoints(self) -> list[Path]:
        return find_checkpoints(self.layout.checkpoints_dir)

    # --- queue, interrupt, progress ------------------------------------------------------------------
    @contextlib.contextmanager
    def gpu_lock(self) -> Iterator[None]:
        with self._gpu_lock:
            yield None


    # --- models ----------------------------------------------------------------------------------------
    def release_model(self) -> None:
        with self._cache_lock:
            self._cache.clear()
        _free_memory()

    def restore_model(self) -> None:
        return None  # pipelines load lazily on the next generate()

    def pipeline(self, request: GenerationRequest) -> Any:
        """The cached pipeline for the request's model, loaded on first use (replacing the previous one)."""
        key, loader, source = self._model_source(request)
        with self._cache_lock:
            if key in self._cache:
                return self._cache[key]
            self._cache.clear()
        _free_memory()
        pipe = loader(source)
        pipe = self._prepare(pipe)
        with self._cache_lock:
            self._cache[key] = pipe
        return pipe

    def _model_source(self, request: GenerationRequest) -> tuple[tuple[Any, ...], PipelineLoader, Path]:
        if request.model_dir is not None:
            folder = Path(request.model_dir)
            if not (folder / "model_index.json").is_file():
                raise ModelError(f"Model folder {folder} has no model_index.json; create the model again "
                                 "from a checkpoint.")
            return ("folder", str(folder.resolve()), *_file_identity(folder)), self._folder_loader, folder
        if request.checkpoint is not None:
            path = Path(request.checkpoint)
            if not path.is_file():
                raise ModelError(f"Checkpoint {path} does not exist; pick one from {self.layout.checkpoints_dir}.")
            return ("file", str(path.resolve()), *_file_identity(path)), self._checkpoint_loader, path
        raise ModelError("Nothing to generate with: the request names neither a model folder nor a checkpoint.")

    def _prepare(self, pipe: Any) -> Any:
        device = self._device or _default_device()
        if hasattr(pipe, "to"):
            pipe = pipe.to(device)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        return pipe

    # --- drawing ---------------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> list[Any]:
        """`request.count` images, image i with seed `seed + i` whatever the batch size."""
        pipe = self.pipeline(request)
        batch = max(1, request.batch_size)
        images: list[Any] = []
        for start in range(0, request.count, batch):
            if self.interrupted():
                break
            size = min(batch, request.count - start)
            images.extend(self._draw(pipe, request, request.seed + start, size))
        return images

    def _draw(self, pipe: Any, request: GenerationRequest, first_seed: int, size: int) -> list[Any]:
        import torch

        from ..models.components import call_options

        # One CPU generator per image: image i depends on its seed only, not on the batch it was drawn in.
        generators = [torch.Generator(device="cpu").manual_seed(first_seed + i) for i in range(size)]
        with torch.no_grad():
            output = pipe(prompt=[request.prompt] * size, negative_prompt=[request.negative_prompt] * size,
                          num_inference_steps=request.steps, guidance_scale=request.cfg_scale,
                          width=request.width, height=request.height, generator=generators, output_type="pil",
                          **call_options(pipe))
        return list(output.images)


def _default_device() -> str:
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"
