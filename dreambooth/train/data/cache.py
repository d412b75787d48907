"""Latent cache: encode each (image content, bucket, crop, flip) once, in memory or on disk.

The key is the hash of the image bytes plus everything that changes the pixels fed to the VAE
(bucket size - hence resolution -, crop offset, flip) and a caller namespace (e.g. the VAE and its
dtype), so an edited image, a new resolution or a flip is a miss and never a stale latent.
With random crop every new offset is a new entry. Disk entries are single .safetensors files
written atomically; an unreadable one is re-encoded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from ...atomic import save_safetensors
from ...config.schema import TrainingConfig
from .batching import BatchItem
from .pixels import load_pixels

CACHE_FORMAT = 1
MODES = ("off", "memory", "disk")


class LatentCache:
    def __init__(self, mode: str, folder: Path | None, namespace: str = ""):
        if mode not in MODES:
            raise ValueError(f"latent cache mode {mode!r} is not one of {', '.join(MODES)}")
        if mode == "disk" and folder is None:
            raise ValueError("the disk latent cache needs a folder")
        self.mode = mode
        self.folder = Path(folder) if folder is not None else None
        self.namespace = namespace
        self.hits = 0
        self.misses = 0
        self._memory: dict[str, torch.Tensor] = {}

    def key(self, item: BatchItem) -> str:
        parts = (CACHE_FORMAT, self.namespace, item.record.content_hash, item.bucket, item.flip, item.crop)
        return hashlib.sha1(repr(parts).encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, item: BatchItem, config: TrainingConfig,
            encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The item's latent (C, H/8, W/8). `encode` gets a (1, 3, H, W) pixel batch in [-1, 1].

        Always returned on the CPU (hits and misses alike, so a batch stacks on one device); the
        caller moves it to its device.
        """
        if self.mode == "off":
            self.misses += 1
            return self._encode(item, config, encode)
        key = self.key(item)
        cached = self._memory.get(key) if self.mode == "memory" else self._load(key)
        if cached is not None:
            self.hits += 1
            # A copy, so a caller scaling the latent in place cannot corrupt the cached entry.
            return cached.clone() if self.mode == "memory" else cached
        self.misses += 1
        latent = self._encode(item, config, encode)
        self._store(key, latent.clone() if self.mode == "memory" else latent, item)
        return latent

    def _encode(self, item: BatchItem, config: TrainingConfig,
                encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        pixels, _ = load_pixels(item, config)
        with torch.no_grad():
            latent = encode(pixels.unsqueeze(0))
        latent = latent[0] if latent.dim() == 4 and latent.shape[0] == 1 else latent
        return latent.detach().cpu()

    def _load(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(path))["latent"]
        except Exception:  # noqa: BLE001 - a damaged entry is simply encoded again
            return None

    def _store(self, key: str, latent: torch.Tensor, item: BatchItem) -> None:
        if self.mode == "memory":
            self._memory[key] = latent
            return
        metadata = {"image": str(item.record.path), "bucket": f"{item.bucket[0]}x{item.bucket[1]}"}
        save_safetensors({"latent": latent.contiguous()}, self.path(key), metadata=metadata)

    def __len__(self) -> int:
        if self.mode == "memory":
            return len(self._memory)
        if self.mode == "disk" and self.folder is not None and self.folder.is_dir():
            return sum(1 for _ in self.folder.glob("*/*.safetensors"))
        return 0
