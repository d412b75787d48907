"""Device, precision, attention and which parameters train: the setup the loop runs on."""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..families import get_family
from ..families.base import DENOISER_PART

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Part names of the text encoders: each encoder's diffusers folder, in the family's order.
TEXT_GROUPS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def text_parts(components: Any, trainable_only: bool = False) -> list[tuple[str, Any]]:
    """(part name, encoder) of each text encoder the model holds; with `trainable_only`, of those that
    'train_text_encoder' may train (SD3's T5 never does)."""
    specs = components.model_family.text_encoders
    return [(spec.folder, encoder) for spec, encoder in zip(specs, components.text_encoders, strict=True)
            if encoder is not None and (spec.trainable or not trainable_only)]


def compute_dtype(config: Any) -> torch.dtype:
    return DTYPES[config.mixed_precision]


def check_precision(config: Any, device: torch.device) -> None:
    if config.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError("Setting 'mixed_precision': fp16 needs a CUDA GPU; use bf16 (fast on recent CPUs) "
                          "or no.")


def autocast(config: Any, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if config.mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype(config))


def set_tf32(allowed: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def setup_attention(denoiser: Any, config: Any, device: torch.device, warn: Callable[[str], None]) -> str:
    """'xformers' when asked, on CUDA, and importable; otherwise PyTorch SDPA (diffusers' default)."""
    if config.attention != "xformers":
        return "sdpa"
    reason = None
    if device.type != "cuda":
        reason = "it needs a CUDA GPU"
    else:
        try:
            denoiser.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as error:  # not installed or built for another torch/CUDA
            reason = f"it cannot be used here ({error})"
    warn(f"Setting 'attention': xformers is not used because {reason}; training uses PyTorch SDPA attention, "
         "which is as fast on most setups.")
    return "sdpa"


def full_trainable(components: Any, config: Any) -> dict[str, list[torch.nn.Parameter]]:
    """Full fine-tune: every denoiser weight and/or every trainable text-encoder weight trains."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    if config.train_unet:
        groups[DENOISER_PART] = list(components.denoiser.parameters())
    if config.train_text_encoder:
        specs = {spec.folder: spec for spec in components.model_family.text_encoders}
        for name, encoder in text_parts(components, trainable_only=True):
            frozen = "text_projection.weight" if specs[name].identity_projection else None
            groups[name] = [param for key, param in encoder.named_parameters() if key != frozen]
    return groups


def trainable_parameters(components: Any, config: Any) -> dict[str, list[torch.nn.Parameter]]:
    for module in components.modules():
        module.requires_grad_(False)
    if config.method == "lora":
        from .lora import add_lora

        groups = add_lora(components, config)
        groups = {name: params for name, params in groups.items()
                  if params and (config.train_unet if name == DENOISER_PART else config.train_text_encoder)}
    else:
        groups = full_trainable(components, config)
    for params in groups.values():
        for param in params:
            param.requires_grad_(True)
    return {name: params for name, params in groups.items() if params}


def vae_dtype(compute: torch.dtype) -> torch.dtype:
    """The frozen VAE's dtype: the compute dtype, except fp32 under fp16, which overflows into NaN (SDXL's
    VAE especially)."""
    return torch.float32 if compute == torch.float16 else compute


def load_dtypes(config: Any) -> dict[str, torch.dtype]:
    """Each part's dtype at load time: frozen weights straight in the compute dtype (one pass over the file
    instead of load-then-cast: 0.4 s sooner to the first SD1.5 LoRA step), trained ones as fp32 masters."""
    compute = compute_dtype(config)
    lora = config.method == "lora"  # LoRA trains adapters only: every base weight is frozen
    text = compute if lora or not config.train_text_encoder else torch.float32
    # An encoder that never trains (SD3's T5-XXL) loads in the compute dtype: 19 GB in fp32.
    encoders = {spec.folder: text if spec.trainable else compute for spec in get_family(config.model_family).text_encoders}
    return {DENOISER_PART: compute if lora or not config.train_unet else torch.float32,
            "vae": vae_dtype(compute), **dict.fromkeys(TEXT_GROUPS, text), **encoders}


def cast_frozen(components: Any, trainable: dict[str, list[torch.nn.Parameter]], dtype: torch.dtype,
                device: torch.device) -> None:
    """Frozen weights in the compute dtype (half the memory, faster); trained ones stay fp32 masters."""
    from .quantize import is_quantized

    trained = {id(p) for params in trainable.values() for p in params}
    for module in components.modules():
        frozen_dtype = vae_dtype(dtype) if module is components.vae else dtype
        module.to(device)
        for param in module.parameters():
            if id(param) in trained:
                param.data = param.data.float()
            elif not is_quantized(param):  # a quantized base keeps its storage ('base_quantization')
                param.data = param.data.to(frozen_dtype)


def use_channels_last(device: torch.device) -> bool:
    """NHWC convolutions: oneDNN's CPU kernels are faster on them (measured 20-45% on the SD1.5 UNet's
    bf16 forward+backward at 512 px); not measured on CUDA yet, so GPUs keep the default layout."""
    return device.type == "cpu"


def set_memory_format(components: Any, channels_last: bool) -> None:
    """Denoiser and VAE convolution weights in channels_last (or back to contiguous for saving: safetensors
    writes contiguous tensors only). Parameters keep their identity, so the optimizer is unaffected."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for module in (components.denoiser, components.vae):
        module.to(memory_format=memory_format)


def file_mapped_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process that are memory maps of files (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return sorted(ranges)


def own_memory(components: Any) -> int:
    """Copy every weight that still lives in a checkpoint file's memory map into its own memory.

    safetensors maps the whole file and hands out tensors inside it; the map lives while any of them does,
    and keeps resident the pages of every weight that casting or channels_last already copied, while the
    optimizer's writes turn the rest into private copies (measured: 2.4 GiB extra for full SD1.5 training).
    Returns the bytes copied.
    """
    ranges = file_mapped_ranges()
    starts = [low for low, _ in ranges]
    copied = 0
    for module in components.modules():
        for tensor in (*module.parameters(), *module.buffers()):
            index = bisect.bisect_right(starts, tensor.data_ptr()) - 1
            if index >= 0 and tensor.data_ptr() < ranges[index][1]:
                tensor.data = tensor.data.clone()
                copied += tensor.nelement() * tensor.element_size()
    return copied


# glibc's mallopt options and their defaults (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
GLIBC_DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_MMAP_MAX: 65536}


def glibc() -> Any | None:
    """The process's C library when it is glibc (mallopt, malloc_trim); None elsewhere (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool) -> Iterator[bool]:
    """Keep freed tensor memory in the process for reuse while training on CPU; yields whether it does.

    glibc gives every tensor over 32 MB its own mmap and unmaps it on free, so each step's gradients and
    weight casts fault in (and the kernel zeroes) gigabytes of fresh pages: about 600 000 page faults and
    0.4 s per full SD1.5 step, measured. Serving them from the heap instead leaves about 7 000 (in a worker
    thread, glibc's per-thread arena reuses tensors up to 64 MB this way; bigger ones still map fresh pages).
    Afterwards the defaults return and malloc_trim hands the freed memory back to the system.
    """
    libc = glibc() if enabled else None
    if libc is None:
        yield False
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield True
    finally:
        for option, value in GLIBC_DEFAULTS.items():
            libc.mallopt(option, value)
        libc.malloc_trim(0)


def freeze(params: list[torch.nn.Parameter]) -> None:
    for param in params:
        param.requires_grad_(False)
        param.grad = None


def set_train_mode(components: Any, trainable: dict[str, list[torch.nn.Parameter]]) -> None:
    """Trained modules in train mode (LoRA dropout acts), the rest in eval mode."""
    components.vae.eval()
    components.denoiser.train(DENOISER_PART in trainable)
    for name, encoder in text_parts(components):
        encoder.train(name in trainable)
