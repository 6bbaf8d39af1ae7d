"""GroupNorm (and GroupNorm then SiLU) for fp32 channels-last maps on the CPU, without autograd.

The U-Net and the VAE normalise every block's input. PyTorch's CPU group norm, eager or as inductor
generates it, takes 0.3-0.9 ms for a (8, 64, 16, 16) map on two cores, several times what reading and
writing it costs; group_norm_cpu.cpp does it, SiLU included, in about 0.1 ms, closer to float64 than
PyTorch's (tests/test_cpu_norm.py). It has no backward pass: training, and anything else that
records gradients, keeps nn.GroupNorm.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .cpu_kernels import available, library, loaded

MAX_CHUNK = 64  # the kernel's widest run of whole groups, lcm(C / G, 8) channels at least


def supports(channels: int, groups: int) -> bool:
    """Whether the kernel takes this many channels in this many groups."""
    return channels % 8 == 0 and channels % groups == 0 and math.lcm(channels // groups, 8) <= MAX_CHUNK


def applies(x: torch.Tensor, norm: nn.GroupNorm) -> bool:
    """Whether norm(x) runs the kernel: an affine fp32 norm of a channels-last CPU map, nothing recording gradients.

    Inside a torch.compile trace it runs if building the layer loaded the library before.
    """
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.numel() > 0
            and norm.affine and norm.weight.dtype == torch.float32 and supports(x.shape[1], norm.num_groups)
            and x.is_contiguous(memory_format=torch.channels_last)):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad or norm.bias.requires_grad):
        return False
    return loaded() if torch.compiler.is_compiling() else available()


_lib = torch.library.Library("diffusion", "FRAGMENT")
_lib.define("group_norm(Tensor x, Tensor weight, Tensor bias, int groups, float eps, bool silu) -> Tensor")


def _group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                silu: bool) -> torch.Tensor:
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU group norm kernel is not available here; use nn.GroupNorm")
    B, C, H, W = x.shape
    if not (x.dtype == weight.dtype == bias.dtype == torch.float32 and weight.shape == bias.shape == (C,)):
        raise ValueError(f"the CPU group norm kernel takes fp32 x (B, C, H, W) and weight, bias (C,); got "
                         f"{x.dtype} {tuple(x.shape)}, {weight.dtype} {tuple(weight.shape)}, {bias.dtype} {tuple(bias.shape)}")
    if not supports(C, groups):
        raise ValueError(f"the CPU group norm kernel does not take {C} channels in {groups} groups")
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    if x.numel() == 0:  # the kernel reads each image's first row
        return out
    if lib.group_norm_forward(x.data_ptr(), weight.contiguous().data_ptr(), bias.contiguous().data_ptr(), out.data_ptr(),
                              B, H * W, C, groups, eps, int(silu), torch.get_num_threads()):
        raise ValueError(f"the CPU group norm kernel does not take {C} channels in {groups} groups")
    return out


_lib.impl("group_norm", _group_norm, "CPU")


@torch.library.register_fake("diffusion::group_norm")
def _(x, weight, bias, groups, eps, silu):
    return torch.empty_like(x, memory_format=torch.channels_last)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, silu: bool = False) -> torch.Tensor:
    """norm(x), then SiLU if `silu`, through the kernel: (B, C, H, W) channels last -> the same."""
    return torch.ops.diffusion.group_norm(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)
