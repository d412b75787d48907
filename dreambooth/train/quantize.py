"""A quantized frozen base for LoRA training ('base_quantization'): the denoiser's linear layers stored in fewer
bits, the LoRA adapters on top of them in full precision (QLoRA).

* nf4 / int8: bitsandbytes' Linear4bit (NF4 blocks of 64 with double-quantized scales) and Linear8bitLt
  (LLM.int8 with fp16 outliers off: plain int8 weights with a scale per row); they compute in the compute dtype.
* fp8: weights stored as float8 e4m3 and cast to the compute dtype layer by layer as they run (diffusers'
  layerwise casting hooks, diffusers 0.32 and newer).

These change what training computes (the frozen weights are rounded), so they are real settings, and they work
the same on CPU as on a GPU (bitsandbytes has CPU kernels); only the memory they save matters on a GPU.
The weights in working/ are never touched: quantization happens to the loaded copy only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError

FP8_STORAGE = torch.float8_e4m3fn


def check_quantization(config: Any) -> None:
    if config.base_quantization == "none":
        return
    if config.method != "lora":
        raise ConfigError(f"Setting 'base_quantization': {config.base_quantization} stores the frozen base in "
                          "fewer bits, which only a LoRA can train on; set 'method' to lora or "
                          "'base_quantization' to none.")


def _bitsandbytes(mode: str) -> Any:
    try:
        import bitsandbytes
    except Exception as error:  # not installed, or no build for this platform
        raise ConfigError(f"Setting 'base_quantization': {mode} needs the bitsandbytes package, which cannot be "
                          f"imported here ({error}); install it (pip install bitsandbytes), or choose fp8 or "
                          "none.") from None
    return bitsandbytes


def _linears(model: torch.nn.Module, wanted: Callable[[str], bool]) -> list[tuple[str, torch.nn.Linear]]:
    return [(name, module) for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and wanted(name)]


def _replace(model: torch.nn.Module, name: str, layer: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def _bnb_layer(bnb: Any, linear: torch.nn.Linear, mode: str, compute_dtype: torch.dtype,
               device: torch.device) -> torch.nn.Module:
    weight = linear.weight.detach()
    bias = linear.bias is not None
    if mode == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.to(compute_dtype).cpu(), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = torch.nn.Parameter(linear.bias.detach().to(compute_dtype).cpu(), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes while moving the weight onto the device


def _layerwise_casting() -> Callable[..., Any]:
    try:
        from diffusers.hooks import apply_layerwise_casting
    except ImportError:
        import diffusers

        raise ConfigError(f"Setting 'base_quantization': fp8 needs diffusers 0.32 or newer (this is "
                          f"{diffusers.__version__}); choose nf4, int8 or none.") from None
    return apply_layerwise_casting


def quantize_base(model: torch.nn.Module, mode: str, compute_dtype: torch.dtype, device: torch.device,
                  wanted: Callable[[str], bool] = lambda name: True) -> int:
    """Store the plain linear layers of `model` (those `wanted` by name) in `mode`; returns how many."""
    if mode == "none":
        return 0
    layers = _linears(model, wanted)
    if mode == "fp8":
        apply = _layerwise_casting()
        for _, linear in layers:
            apply(linear, storage_dtype=FP8_STORAGE, compute_dtype=compute_dtype, skip_modules_pattern=())
        return len(layers)
    bnb = _bitsandbytes(mode)
    for name, linear in layers:
        _replace(model, name, _bnb_layer(bnb, linear, mode, compute_dtype, device))
    return len(layers)


def is_quantized(param: torch.Tensor) -> bool:
    """A weight held in a quantized storage (never cast to the compute dtype or back)."""
    return param.dtype in (torch.uint8, torch.int8, FP8_STORAGE)
