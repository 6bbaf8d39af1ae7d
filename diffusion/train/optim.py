"""The optimiser, its learning-rate schedule, and the EMA of the weights."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import nn

from ..io.weights import WeightsError


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel: on CPU it is ~10x faster than the per-tensor loop, which matters
    for a text encoder whose 49k-token embedding dwarfs a small U-Net."""
    return torch.optim.AdamW(params, fused=True, **kwargs)


def lr_lambda(warmup_steps: int, max_steps: int, schedule: str = "constant") -> Callable[[int], float]:
    """LR multiplier for optimizer step s (0-based): linear warmup to 1, then constant or cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class EMA:
    """Exponential moving average of a module's weights, decay min(decay, (1 + s)/(10 + s)) with warmup.

    The warmup (as in diffusers' EMAModel) lets early, poor weights fade out quickly. Buffers are copied.
    """

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1.0 - d)  # shadow = d·shadow + (1 − d)·v
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise WeightsError(f"EMA weights do not match the model: {sorted(missing)[:3]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)

    @contextlib.contextmanager
    def swapped_in(self, module: nn.Module):
        """Use the EMA weights inside the block, and the training weights again after it."""
        backup = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield module
        finally:
            module.load_state_dict(backup)
