"""The VAE's adversary."""

from __future__ import annotations

import math

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017), as LDM's NLayerDiscriminator: each output logit judges one patch.

    GroupNorm instead of BatchNorm, so real and fake images can share one forward pass and DDP has no
    batch statistics to synchronise. Use fewer layers for small images (`layers_for`).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, n_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(32, out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    @staticmethod
    def layers_for(resolution: int) -> int:
        """3 layers (70x70 patches) from 128 px; fewer below, so the last map stays at least 2x2."""
        return max(1, min(3, int(math.log2(resolution)) - 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h, w) logits
