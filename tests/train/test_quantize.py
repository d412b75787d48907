"""A quantized frozen base ('base_quantization'): the denoiser's linear layers really stored in fewer bits, the
LoRA on top trained in full precision, and one clear message where the package it needs is missing."""

from __future__ import annotations

import builtins
import copy
import importlib.util
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from dreambooth.errors import ConfigError
from dreambooth.train import quantize


class TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(128, 64)
        self.second = torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.nn.functional.gelu(self.first(x)))


def lora_step(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(2)  # the same random adapters on both bases
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["first", "second"], init_lora_weights=False), model)
    trained = [param for name, param in model.named_parameters() if "lora_" in name]
    for param in model.parameters():
        param.requires_grad_(any(param is p for p in trained))
    for param in trained:
        param.data = param.data.float()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 128))
    out.float().pow(2).mean().backward()
    return out.float().detach(), [param.grad for param in trained]


MODES = ["nf4", "int8"] + (["fp8"] if importlib.util.find_spec("diffusers.hooks") else [])


@pytest.mark.parametrize("mode", MODES)
def test_quantized_layers_train_a_lora_on_top(mode: str) -> None:
    if mode != "fp8":
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    plain = TwoLayers()
    model = copy.deepcopy(plain)
    assert quantize.quantize_base(model, mode, torch.bfloat16, torch.device("cpu")) == 2
    stored = [param for name, param in model.named_parameters() if name.endswith("weight")]
    assert all(quantize.is_quantized(param) for param in stored)
    out, grads = lora_step(model)
    reference, _ = lora_step(copy.deepcopy(plain))
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads)
    assert 0 < float((out - reference).abs().max()) < 0.15 * float(reference.abs().max())  # rounded base, same model
    assert all(quantize.is_quantized(param) for name, param in model.named_parameters()
               if name.endswith("base_layer.weight"))


def test_only_a_lora_trains_on_a_quantized_base() -> None:
    with pytest.raises(ConfigError, match="'base_quantization': nf4 .* set 'method' to lora"):
        quantize.check_quantization(SimpleNamespace(base_quantization="nf4", method="dreambooth"))
    quantize.check_quantization(SimpleNamespace(base_quantization="nf4", method="lora"))


def test_missing_bitsandbytes_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def refuse(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    with pytest.raises(ConfigError, match=r"'base_quantization': int8 needs the bitsandbytes package.*fp8 or none"):
        quantize.quantize_base(TwoLayers(), "int8", torch.bfloat16, torch.device("cpu"))


@pytest.mark.skipif(importlib.util.find_spec("diffusers.hooks") is not None,
                    reason="this diffusers has layerwise casting; the refusal is for diffusers before 0.32")
def test_fp8_on_old_diffusers_names_the_version() -> None:
    with pytest.raises(ConfigError, match=r"fp8 needs diffusers 0\.32 or newer \(this is 0\.\d+"):
        quantize.quantize_base(TwoLayers(), "fp8", torch.bfloat16, torch.device("cpu"))
