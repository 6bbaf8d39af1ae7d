"""Image-quality figures."""

from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2, so MAX² = 4)."""
    mse = (x.float().clamp(-1, 1) - y.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(4.0 / mse.clamp(min=1e-10))).mean())
