"""The U-Net noise predictor eps_theta(x_t, t, context) of latent diffusion (Rombach et al. 2022).

The network knows nothing about noise schedules: it maps a noisy latent, an integer timestep and
text-token embeddings to a tensor of the latent's shape. Layout follows SD v1 (and diffusers'
UNet2DConditionModel): per level, `num_res_blocks` ResBlocks each optionally followed by a
SpatialTransformer, a stride-2 conv between levels, a ResBlock-Transformer-ResBlock middle, and a
mirrored decoder with `num_res_blocks + 1` blocks per level fed by skip connections. SD 2.x differs
only in config: heads of a fixed width (`head_dim`) and linear transformer projections
(`linear_projection`); SD's weights load through diffusion/io/sd_unet.py.

Conv weights, and so every activation, live in channels_last (NHWC) memory. oneDNN's CPU convolutions
and cuDNN's tensor-core kernels run faster on it (on CPUs without bf16 hardware, bf16 convolutions
run several times faster), and it makes a SpatialTransformer's (B, C, H, W) -> (B, H*W, C) token
reshapes free views. Only the strides differ: parameter names, shapes and values are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import UNetConfig
from .layers import (
    Attention, Conv2d, Downsample, PreparedContext, ResBlock, SpatialTransformer, Upsample, linear_all, norm_silu, timestep_embedding,
    zero_module,
)


class UNetBlock(nn.Module):
    """A ResBlock, an optional SpatialTransformer, and an optional resampler, applied in that order."""

    def __init__(self, res: ResBlock | None, attn: SpatialTransformer | None, resample: nn.Module | None):
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, h, emb_out, context, out_size=None):
        # emb_out: the ResBlock's timestep projection (UNet.timestep_projections), None without one.
        if self.res is not None:
            h = self.res(h, emb_out)
        if self.attn is not None:
            h = self.attn(h, context)
        if isinstance(self.resample, Upsample):
            h = self.resample(h, out_size)
        elif self.resample is not None:
            h = self.resample(h)
        return h


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_ch = 4 * mc
        widths = [mc * m for m in cfg.channel_mult]
        for w in [mc, *widths]:
            heads = cfg.heads_at(w)
            if w % groups or not heads or w % heads:
                raise ValueError(f"U-Net width {w} must be divisible by norm_groups={groups} and into {heads} attention heads")

        def res(i, o):
            return ResBlock(i, o, emb_ch, groups, cfg.dropout, zero_init=True, eps=cfg.norm_eps)

        def transformer(ch):
            return SpatialTransformer(ch, cfg.heads_at(ch), cfg.context_dim, cfg.transformer_depth, groups, cfg.linear_projection)

        def attn(ch, level):
            return transformer(ch) if level in cfg.attention_levels else None

        self.time_mlp = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.conv_in = Conv2d(cfg.in_channels, mc, 3, padding=1)

        # Encoder: remember each block's output width, since the decoder concatenates them back.
        self.down = nn.ModuleList()
        skip_widths, ch = [mc], mc
        for level, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                self.down.append(UNetBlock(res(ch, w), attn(w, level), None))
                ch = w
                skip_widths.append(ch)
            if level < len(widths) - 1:
                self.down.append(UNetBlock(None, None, Downsample(ch)))
                skip_widths.append(ch)

        mid_attn = transformer(ch) if cfg.mid_attention else None
        self.mid = nn.ModuleList([UNetBlock(res(ch, ch), mid_attn, None), UNetBlock(res(ch, ch), None, None)])

        # Decoder: num_res_blocks + 1 blocks per level, each eating one skip; upsample after the last.
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            w = widths[level]
            for i in range(cfg.num_res_blocks + 1):
                upsample = Upsample(w) if level > 0 and i == cfg.num_res_blocks else None
                self.up.append(UNetBlock(res(ch + skip_widths.pop(), w), attn(w, level), upsample))
                ch = w

        self.norm_out = nn.GroupNorm(groups, ch, eps=cfg.norm_eps)
        self.conv_out = zero_module(Conv2d(ch, cfg.out_channels, 3, padding=1))
        for slot, layer in enumerate(self.cross_attentions()):
            layer.kv_slot = slot
        # Module.to, load_state_dict and optimisers preserve this layout from here on.
        self.to(memory_format=torch.channels_last)

    def cross_attentions(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention) and m.is_cross]

    def prepare_context(self, context: torch.Tensor) -> PreparedContext:
        """`context` (B, L, context_dim) with every cross-attention layer's keys and values projected,
        all in one product. forward does this itself when given the context alone; a sampler that
        calls it with the same text at every step passes this instead, computed once."""
        return PreparedContext(context, linear_all(context, [layer.to_kv for layer in self.cross_attentions()]))

    def timestep_projections(self, t: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """Per block of down, mid and up in order, its ResBlock's emb_proj(SiLU(emb(t))), (B, C) (None
        where a block has no ResBlock), all in one product."""
        emb = F.silu(self.time_mlp(timestep_embedding(t, self.cfg.model_channels).to(dtype)))  # (B, 4*mc)
        blocks = [*self.down, *self.mid, *self.up]
        projected = iter(linear_all(emb, [block.res.emb_proj for block in blocks if block.res is not None]))
        return [next(projected) if block.res is not None else None for block in blocks]

    def _run(self, block: UNetBlock, h, emb_out, context, out_size=None):
        if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb_out, context, out_size, use_reentrant=False)
        return block(h, emb_out, context, out_size)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor | PreparedContext) -> torch.Tensor:
        """x_t: (B, C, H, W) noisy latents; t: (B,) or scalar timesteps; context: (B, L, context_dim),
        or that from prepare_context."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if not isinstance(context, PreparedContext):
            context = self.prepare_context(context)
        emb_outs = iter(self.timestep_projections(t, x_t.dtype))

        h = self.conv_in(x_t)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, next(emb_outs), context)
            skips.append(h)
        for block in self.mid:
            h = self._run(block, h, next(emb_outs), context)
        for block in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            # An upsampler must land on the next skip's size, which is odd when the input side was.
            out_size = tuple(skips[-1].shape[-2:]) if block.resample is not None else None
            h = self._run(block, h, next(emb_outs), context, out_size)
        # Hand back the usual contiguous (B, C, H, W) layout; with C = 4 the copy is negligible.
        return self.conv_out(norm_silu(self.norm_out, h)).contiguous()
