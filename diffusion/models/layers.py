"""Layers shared by the VAE and the U-Net: ResNet blocks, resampling, attention, transformer blocks."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from diffusion.models import cpu_attention, cpu_conv, cpu_kernels, cpu_norm


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that a residual branch starts as the identity (as LDM does)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Conv2d(nn.Conv2d):
    """nn.Conv2d, whose CPU inference reuses a weight reordered for oneDNN (cpu_conv)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_conv.applies(x, self):
            return cpu_conv.conv2d(x, self)
        return super().forward(x)

    def _apply(self, fn, recurse=True):
        cpu_conv.forget(self.weight)  # moved or cast: a copy of the old weight would only hold memory
        return super()._apply(fn, recurse)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), cos first (LDM / diffusers flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def linear_all(x: torch.Tensor, layers: list[nn.Linear]) -> tuple[torch.Tensor, ...]:
    """(layer(x) for layer in layers), as one matrix product of x by the layers' stacked weights.

    One large product runs much faster than many small ones on a CPU, where each call pays its
    threads' start-up. The outputs are views into one buffer. The weights are read as `weight`, so
    a parametrization (LoRA training) is applied, and gradients reach each layer's own parameters.
    """
    if not layers:
        return ()
    if len({layer.bias is None for layer in layers}) > 1:
        raise ValueError("linear_all: the layers must all have biases or all have none")
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)


def pointwise(layer: nn.Linear | nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A Linear layer, or a 1x1 conv as the same per-position map, on (..., C) tokens.

    A 1x1 conv over a channels-last map is this product over its rows; oneDNN's convolution ran it
    at half the speed of the matrix product at the U-Net's sizes.
    """
    weight = layer.weight.flatten(1) if isinstance(layer, nn.Conv2d) else layer.weight  # (C_out, C_in)
    return linear(tokens, weight, layer.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias). Compiled for inference, the bias is added after the product instead,
    so that inductor fuses it into the kernel that reads the output next: the CPU's addmm first
    copies the bias into every output row, one more pass over memory in a call of its own. (Compiled
    training steps measured no faster that way.)"""
    if bias is None or torch.is_grad_enabled() or not torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    return F.linear(x, weight) + bias


def conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a 1x1 conv on a (B, C, H, W) map; on a channels-last map, as `pointwise` over its
    positions, which gives a channels-last map."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        return conv(x)
    return pointwise(conv, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, H, W, C) views


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """norm(x), then SiLU if `silu`. fp32 channels-last maps on the CPU run cpu_norm's kernel, both
    steps in one pass (and in one backward pass).

    Otherwise, with no gradient recorded the SiLU runs in place on the norm's fresh output; under
    autograd it must not, or autograd copies the input it keeps for the backward pass.
    """
    if cpu_norm.applies(x, norm):
        return cpu_norm.group_norm(x, norm, silu)
    y = norm(x)
    return F.silu(y, inplace=not torch.is_grad_enabled()) if silu else y


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x) over the last dimension. Compiled for inference on the CPU, as its mean and then the mean
    square of x - mean: inductor turns F.layer_norm into a Welford reduction, which took 0.6 ms for
    (8, 256, 64) tokens against 0.35 ms for these two plain sums, both fused with the residual add
    before them. (Compiled training steps measured 4% slower that way: their backward is another graph.)"""
    if not (torch.compiler.is_compiling() and x.device.type == "cpu" and not torch.is_grad_enabled()
            and norm.weight is not None and norm.bias is not None and len(norm.normalized_shape) == 1):
        return norm(x)
    x_c = x - x.mean(-1, keepdim=True)
    y = x_c * torch.rsqrt(x_c.square().mean(-1, keepdim=True) + norm.eps)
    return y * norm.weight + norm.bias


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """SiLU(norm(x))."""
    return group_norm(norm, x, silu=True)


# The blocks below add residuals in place into a branch's fresh output (a conv's or a linear's), as
# `branch.add_(x)`: the same sum as x + branch, without allocating another activation. Autograd
# allows it because neither layer needs its own output for the backward pass.


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with an optional timestep projection added in between."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_ch: int = 0,
        groups: int = 32,
        dropout: float = 0.0,
        zero_init: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_ch, out_ch) if emb_ch else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        if zero_init:
            zero_module(self.conv2)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        # Built (once per machine) and loaded here rather than on the first call, which may be inside
        # a torch.compile trace, where nothing can be built.
        cpu_kernels.library()

    def forward(self, x: torch.Tensor, emb_out: torch.Tensor | None = None) -> torch.Tensor:
        """emb_out: this block's timestep projection emb_proj(SiLU(emb)), (B, out_ch). The U-Net
        computes all its blocks' in one product (UNet.timestep_projections)."""
        h = self.conv1(norm_silu(self.norm1, x))
        if emb_out is not None:
            h += emb_out[:, :, None, None]  # (B, out_ch, 1, 1) broadcast over H, W
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        return h.add_(conv1x1(self.skip, x) if isinstance(self.skip, nn.Conv2d) else x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. LDM's VAE pads (0, 1, 0, 1) instead of 1 on each side; both halve H and W."""

    def __init__(self, ch: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # `size` lets the U-Net match a skip connection whose side was odd before downsampling.
        x = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class PreparedContext(NamedTuple):
    """Text conditioning with every cross-attention layer's keys and values already projected.

    They depend on the text only, not on x_t or t, so a sampler's steps can share one projection
    (UNet.prepare_context) instead of repeating it at every step. Slot i holds the to_kv output of
    the cross-attention layer whose `kv_slot` is i.
    """

    context: torch.Tensor  # (B, M, C_ctx)
    kv: tuple[torch.Tensor, ...]  # per layer, (B, M, 2 * dim): keys, then values


class Attention(nn.Module):
    """Multi-head attention. Self-attention uses one fused QKV projection.

    On the CPU, heads 8 to 32 wide run diffusion.models.cpu_attention's kernel (in fp32, also under
    bf16 autocast); everything else runs PyTorch's scaled_dot_product_attention. Both compute the same
    exact softmax attention.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        assert dim % heads == 0, f"attention width {dim} must be divisible by the number of heads {heads}"
        self.heads = heads
        self.is_cross = context_dim is not None
        self.kv_slot = -1  # this layer's entry in a PreparedContext, numbered by the model that owns it
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim, bias=bias)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.to_out = nn.Linear(dim, dim)
        if dim // heads in cpu_attention.HEAD_DIMS:
            cpu_kernels.library()  # as in ResBlock

    def forward(self, x: torch.Tensor, context: torch.Tensor | PreparedContext | None = None) -> torch.Tensor:
        # x: (B, N, C); context: (B, M, C_ctx)
        if self.is_cross:
            q = self.to_q(x)
            kv = context.kv[self.kv_slot] if isinstance(context, PreparedContext) else self.to_kv(context)
            k, v = kv.chunk(2, dim=-1)
        else:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (rearrange(a, "b n (h d) -> b n h d", h=self.heads) for a in (q, k, v))  # views
        if cpu_attention.applies(q, k):
            out = cpu_attention.attention(q, k, v)  # (B, N, h, d), contiguous
        else:
            # SDPA forms q·kᵀ and the softmax in fp32 for fp16 inputs, where SD 2.x's attention would overflow.
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return pointwise(self.to_out, out.flatten(2))


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020), 4x inner width as in SD."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.proj = nn.Linear(dim, 2 * inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two half-width products rather than one product then chunk: each half comes out
        # contiguous, which GELU and the gating product run faster on. Same weights, same sums.
        w_a, w_gate = self.proj.weight.chunk(2)
        b_a, b_gate = self.proj.bias.chunk(2)
        a, gate = linear(x, w_a, b_a), F.gelu(linear(x, w_gate, b_gate))  # (B, N, inner) each
        # In place only without autograd, which would otherwise copy `gate` to keep it.
        return pointwise(self.out, gate.mul_(a) if not torch.is_grad_enabled() else a * gate)


class TransformerBlock(nn.Module):
    """LayerNorm -> self-attention -> LayerNorm -> cross-attention -> LayerNorm -> GEGLU, each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | PreparedContext) -> torch.Tensor:
        x = self.attn1(layer_norm(self.norm1, x)).add_(x)
        x = self.attn2(layer_norm(self.norm2, x), context).add_(x)
        return self.ff(layer_norm(self.norm3, x)).add_(x)


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the H*W positions of a feature map (LDM's SpatialTransformer).

    The projections in and out are 1x1 convs (SD 1.x) or, with `linear`, Linear layers applied to
    the tokens (SD 2.x's use_linear_in_transformer). Both compute the same per-position map; only
    the weight shapes differ, (C, C, 1, 1) against (C, C), so that each layout loads as it is.
    """

    def __init__(self, ch: int, heads: int, context_dim: int, depth: int = 1, groups: int = 32, linear: bool = False):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)
        self.blocks = nn.ModuleList(TransformerBlock(ch, heads, context_dim) for _ in range(depth))
        self.proj_out = zero_module(nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | PreparedContext) -> torch.Tensor:
        # Both layouts run as products over the tokens: free views of channels-last maps.
        _, _, h, w = x.shape
        y = pointwise(self.proj_in, rearrange(group_norm(self.norm, x), "b c h w -> b (h w) c"))
        for block in self.blocks:
            y = block(y, context)
        return rearrange(pointwise(self.proj_out, y), "b (h w) c -> b c h w", h=h, w=w).add_(x)


class SelfAttention2d(nn.Module):
    """Single-head self-attention over a feature map: the VAE's middle block."""

    def __init__(self, ch: int, groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.attn = Attention(ch, heads=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        y = self.attn(rearrange(group_norm(self.norm, x), "b c h w -> b (h w) c"))
        return x + rearrange(y, "b (h w) c -> b c h w", h=h, w=w)
