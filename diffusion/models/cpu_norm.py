"""GroupNorm (and GroupNorm then SiLU) for fp32 channels-last maps on the CPU, with its backward pass.

The U-Net and the VAE normalise every block's input. PyTorch's CPU group norm, eager or as inductor
generates it, takes 0.3-0.9 ms for a (8, 64, 16, 16) map on two cores, several times what reading and
writing it costs; group_norm_cpu.cpp does it, SiLU included, in about 0.1 ms, closer to float64 than
PyTorch's (tests/test_cpu_norm.py). Its backward pass recomputes the group statistics from the input
rather than saving them. Inductor's fused group norm backward for channels-last maps of 2 channels
per group took 4-6 ms per (16, 64, 16, 16) map, some 14% of a compiled training step of the benchmark
U-Net.
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
    """Whether norm(x) runs the kernel: an affine fp32 norm of a channels-last CPU map.

    Inside a torch.compile trace it runs if building the layer loaded the library before.
    """
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.numel() > 0
            and norm.affine and norm.weight.dtype == torch.float32 and supports(x.shape[1], norm.num_groups)
            and x.is_contiguous(memory_format=torch.channels_last)):
        return False
    return loaded() if torch.compiler.is_compiling() else available()


_lib = torch.library.Library("diffusion", "FRAGMENT")
_lib.define("group_norm(Tensor x, Tensor weight, Tensor bias, int groups, float eps, bool silu) -> Tensor")
_lib.define("group_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor bias, int groups, float eps, bool silu)"
            " -> (Tensor, Tensor, Tensor)")


def _kernels_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int):
    """The library, for arguments it can take: the kernel reads raw fp32 memory."""
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU group norm kernel is not available here; use nn.GroupNorm")
    if x.dim() != 4 or not (x.dtype == weight.dtype == bias.dtype == torch.float32
                            and weight.shape == bias.shape == (x.shape[1],)):
        raise ValueError(f"the CPU group norm kernel takes fp32 x (B, C, H, W) and weight, bias (C,); got "
                         f"{x.dtype} {tuple(x.shape)}, {weight.dtype} {tuple(weight.shape)}, {bias.dtype} {tuple(bias.shape)}")
    if not supports(x.shape[1], groups):
        raise _unsupported(x.shape[1], groups)
    return lib


def _unsupported(channels: int, groups: int) -> ValueError:
    return ValueError(f"the CPU group norm kernel does not take {channels} channels in {groups} groups")


def _check(status: int, channels: int, groups: int) -> None:
    if status:  # 2, the only failure: supports() has already refused these
        raise _unsupported(channels, groups)


def _group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                silu: bool) -> torch.Tensor:
    lib = _kernels_for(x, weight, bias, groups)
    B, C, H, W = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    if x.numel() == 0:  # the kernel reads each image's first row
        return out
    _check(lib.group_norm_forward(x.data_ptr(), weight.contiguous().data_ptr(), bias.contiguous().data_ptr(),
                                  out.data_ptr(), B, H * W, C, groups, eps, int(silu), torch.get_num_threads()), C, groups)
    return out


def _group_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                         eps: float, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lib = _kernels_for(x, weight, bias, groups)
    B, C, H, W = x.shape
    dy, x = (t.contiguous(memory_format=torch.channels_last) for t in (dy, x))
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    if x.numel() == 0:
        return dx, weight.new_zeros(C), bias.new_zeros(C)
    per_image = torch.empty(2, B, C)  # each image's share of dweight, dbias
    _check(lib.group_norm_backward(dy.data_ptr(), x.data_ptr(), weight.contiguous().data_ptr(), bias.contiguous().data_ptr(),
                                   dx.data_ptr(), per_image[0].data_ptr(), per_image[1].data_ptr(),
                                   B, H * W, C, groups, eps, int(silu), torch.get_num_threads()), C, groups)
    return dx, per_image[0].sum(0), per_image[1].sum(0)


_lib.impl("group_norm", _group_norm, "CPU")
_lib.impl("group_norm_backward", _group_norm_backward, "CPU")


@torch.library.register_fake("diffusion::group_norm")
def _(x, weight, bias, groups, eps, silu):
    return torch.empty_like(x, memory_format=torch.channels_last)


@torch.library.register_fake("diffusion::group_norm_backward")
def _(dy, x, weight, bias, groups, eps, silu):
    return torch.empty_like(x, memory_format=torch.channels_last), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, groups, eps, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = groups, eps, silu


def _grads(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    return (*torch.ops.diffusion.group_norm_backward(dy, x, weight, bias, *ctx.args), None, None, None)


torch.library.register_autograd("diffusion::group_norm", _grads, setup_context=_setup_context)


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, silu: bool = False) -> torch.Tensor:
    """norm(x), then SiLU if `silu`, through the kernel: (B, C, H, W) channels last -> the same."""
    return torch.ops.diffusion.group_norm(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)
