"""Exponential moving average of the trained parameters (fp32 shadow copies, multi-tensor updates)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, every `update_every` optimizer steps."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, update_every: int = 1):
        self.params = list(params)
        self.decay = decay
        self.update_every = max(1, update_every)
        self.shadow = [p.detach().float().clone() for p in self.params]

    def step(self, optimizer_step: int) -> None:
        """Call after each optimizer step with the 1-based count of steps done."""
        if optimizer_step % self.update_every:
            return
        current = [p.detach().float() for p in self.params]
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the averaged weights into the model (for samples and saves)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, average in zip(self.params, self.shadow, strict=False):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, backup, strict=False):
                    param.copy_(saved)

    def state_dict(self) -> dict[str, object]:
        return {"shadow": self.shadow, "decay": self.decay}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        assert isinstance(shadow, list) and len(shadow) == len(self.shadow)
        # Snapshots are read onto the CPU; the shadow lives beside its parameter.
        self.shadow = [s.to(device=p.device, dtype=torch.float32, copy=True) for s, p in
                       zip(shadow, self.params, strict=True)]
