"""Stable Diffusion U-Net weights in and out: diffusers' UNet2DConditionModel layout and the original
CompVis/Stability layout (the keys under `model.diffusion_model.` of a single-file checkpoint).

Every function here is pure and prefix-free: the caller strips or adds `model.diffusion_model.`.
Our UNet has SD's structure block for block, so the mapping is a renaming, except that our
attention fuses q, k, v (self) and k, v (cross) into one projection each (see sd_keymap).

Shapes tell nearly the whole architecture; they cannot tell how a width splits into attention
heads, nor GroupNorm's group count. A Family supplies those: SD 1.x has 8 heads at every level,
SD 2.x heads of 64 channels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..config import UNetConfig
from ..models.unet import UNet
from .sd_keymap import (
    PLAIN,
    Link,
    Table,
    count_indices,
    from_native,
    link_modules,
    multiples,
    native_shapes,
    require,
    to_native,
)
from .weights import WeightsError

# SD's U-Net ResBlocks and output norm use GroupNorm's default eps (its transformers use 1e-6).
SD_NORM_EPS = 1e-5

RES_DIFFUSERS: Table = {
    "norm1": ("norm1",), "conv1": ("conv1",), "emb_proj": ("time_emb_proj",),
    "norm2": ("norm2",), "conv2": ("conv2",), "skip": ("conv_shortcut",),
}
RES_COMPVIS: Table = {
    "norm1": ("in_layers.0",), "conv1": ("in_layers.2",), "emb_proj": ("emb_layers.1",),
    "norm2": ("out_layers.0",), "conv2": ("out_layers.3",), "skip": ("skip_connection",),
}


@dataclass(frozen=True)
class Family:
    """What shapes cannot tell: heads per level (num_heads, or width // head_dim), and norm groups."""

    num_heads: int = 8
    head_dim: int | None = None
    norm_groups: int = 32


FAMILIES = {"sd1": Family(num_heads=8), "sd2": Family(head_dim=64)}


def _family(family: str | Family) -> Family:
    if isinstance(family, Family):
        return family
    if family not in FAMILIES:
        raise WeightsError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def transformer_table(depth: int) -> Table:
    """A SpatialTransformer's sub-layers; diffusers and CompVis name them alike."""
    table: Table = {"norm": ("norm",), "proj_in": ("proj_in",), "proj_out": ("proj_out",)}
    for d in range(depth):
        ours, theirs = f"blocks.{d}", f"transformer_blocks.{d}"
        table |= {f"{ours}.norm{i}": (f"{theirs}.norm{i}",) for i in (1, 2, 3)}
        table[f"{ours}.attn1.to_qkv"] = tuple(f"{theirs}.attn1.to_{c}" for c in "qkv")
        table[f"{ours}.attn2.to_q"] = (f"{theirs}.attn2.to_q",)
        table[f"{ours}.attn2.to_kv"] = (f"{theirs}.attn2.to_k", f"{theirs}.attn2.to_v")
        for attn in ("attn1", "attn2"):
            table[f"{ours}.{attn}.to_out"] = (f"{theirs}.{attn}.to_out.0",)
        table[f"{ours}.ff.proj"] = (f"{theirs}.ff.net.0.proj",)
        table[f"{ours}.ff.out"] = (f"{theirs}.ff.net.2",)
    return table


def _diffusers_modules(cfg: UNetConfig) -> Iterator[tuple[str, str, Table]]:
    """Our modules beside diffusers'. Pairs for modules a config lacks match no tensor and drop out."""
    tf, per_level = transformer_table(cfg.transformer_depth), cfg.num_res_blocks + 1
    yield from [("time_mlp.0", "time_embedding.linear_1", PLAIN), ("time_mlp.2", "time_embedding.linear_2", PLAIN)]
    yield from [("conv_in", "conv_in", PLAIN), ("norm_out", "conv_norm_out", PLAIN), ("conv_out", "conv_out", PLAIN)]
    # Our down list holds, per level, num_res_blocks (ResBlock, transformer) blocks then a downsampler.
    for i in range(len(cfg.channel_mult) * per_level):
        level, j = divmod(i, per_level)
        yield f"down.{i}.res", f"down_blocks.{level}.resnets.{j}", RES_DIFFUSERS
        yield f"down.{i}.attn", f"down_blocks.{level}.attentions.{j}", tf
        yield f"down.{i}.resample.conv", f"down_blocks.{level}.downsamplers.0.conv", PLAIN
    yield "mid.0.res", "mid_block.resnets.0", RES_DIFFUSERS
    yield "mid.0.attn", "mid_block.attentions.0", tf
    yield "mid.1.res", "mid_block.resnets.1", RES_DIFFUSERS
    # diffusers numbers its up blocks from the deepest level, as our up list runs.
    for i in range(len(cfg.channel_mult) * per_level):
        block, j = divmod(i, per_level)
        yield f"up.{i}.res", f"up_blocks.{block}.resnets.{j}", RES_DIFFUSERS
        yield f"up.{i}.attn", f"up_blocks.{block}.attentions.{j}", tf
        yield f"up.{i}.resample.conv", f"up_blocks.{block}.upsamplers.0.conv", PLAIN


def _compvis_modules(cfg: UNetConfig) -> Iterator[tuple[str, str, Table]]:
    """Our modules beside CompVis's numbered TimestepEmbedSequential blocks."""
    tf, per_level, levels = transformer_table(cfg.transformer_depth), cfg.num_res_blocks + 1, len(cfg.channel_mult)
    yield from [("time_mlp.0", "time_embed.0", PLAIN), ("time_mlp.2", "time_embed.2", PLAIN)]
    yield from [("conv_in", "input_blocks.0.0", PLAIN), ("norm_out", "out.0", PLAIN), ("conv_out", "out.2", PLAIN)]
    # input_blocks.0 is conv_in, so our down[i] is input_blocks[i + 1]; a downsampler sits at .0.op.
    for i in range(levels * per_level):
        yield f"down.{i}.res", f"input_blocks.{i + 1}.0", RES_COMPVIS
        yield f"down.{i}.attn", f"input_blocks.{i + 1}.1", tf
        yield f"down.{i}.resample.conv", f"input_blocks.{i + 1}.0.op", PLAIN
    yield "mid.0.res", "middle_block.0", RES_COMPVIS
    yield "mid.0.attn", "middle_block.1", tf
    yield "mid.1.res", f"middle_block.{2 if cfg.mid_attention else 1}", RES_COMPVIS
    # An upsampler follows the ResBlock, and the transformer when its level has one.
    for i in range(levels * per_level):
        has_attn = levels - 1 - i // per_level in cfg.attention_levels
        yield f"up.{i}.res", f"output_blocks.{i}.0", RES_COMPVIS
        yield f"up.{i}.attn", f"output_blocks.{i}.1", tf
        yield f"up.{i}.resample.conv", f"output_blocks.{i}.{2 if has_attn else 1}.conv", PLAIN


def unet_links(cfg: UNetConfig, layout: str) -> tuple[list[Link], dict[str, tuple[int, ...]]]:
    """Every tensor link between our UNet(cfg) and `layout` ("diffusers" or "compvis"), and our shapes."""
    shapes = native_shapes(lambda: UNet(cfg))
    modules = {"diffusers": _diffusers_modules, "compvis": _compvis_modules}[layout](cfg)
    return link_modules(shapes, modules), shapes


def unet_from_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our UNet state dict from a diffusers UNet2DConditionModel state dict."""
    return to_native(state, *unet_links(cfg, "diffusers"), what="diffusers U-Net weights")


def unet_to_diffusers(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict from ours."""
    return from_native(state, *unet_links(cfg, "diffusers"), what="U-Net weights")


def unet_from_compvis(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our UNet state dict from SD's original keys (without the `model.diffusion_model.` prefix)."""
    return to_native(state, *unet_links(cfg, "compvis"), what="SD U-Net weights")


def unet_to_compvis(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """SD's original U-Net keys (without the `model.diffusion_model.` prefix) from ours."""
    return from_native(state, *unet_links(cfg, "compvis"), what="U-Net weights")


def _transformer_facts(state: dict[str, torch.Tensor], what: str) -> tuple[int, int, bool]:
    """(context_dim, transformer_depth, linear_projection) from the transformers' tensors, alike in both layouts."""
    depths: dict[str, int] = {}
    for key in state:
        if ".transformer_blocks." in key:
            prefix = key.split(".transformer_blocks.", 1)[0]
            depths[prefix] = count_indices(state, prefix + ".transformer_blocks.")
    if not depths:
        return UNetConfig.context_dim, UNetConfig.transformer_depth, UNetConfig.linear_projection
    if len(set(depths.values())) > 1:
        raise WeightsError(f"{what}: transformer depths differ between levels ({sorted(set(depths.values()))}); ours are uniform")
    first = min(depths)
    context_dim = require(state, f"{first}.transformer_blocks.0.attn2.to_k.weight", what).shape[1]
    linear = require(state, f"{first}.proj_in.weight", what).ndim == 2
    return context_dim, next(iter(depths.values())), linear


def _unet_config(state, conv_in: str, conv_out: str, widths: list[int], num_res_blocks: int, attention_levels: tuple[int, ...],
                 mid_attention: bool, family: str | Family, what: str) -> UNetConfig:
    """The config from the facts both layouts yield; the family fills in what shapes cannot tell."""
    fam = _family(family)
    w_in, w_out = require(state, conv_in, what), require(state, conv_out, what)
    context_dim, depth, linear = _transformer_facts(state, what)
    return UNetConfig(
        in_channels=w_in.shape[1], out_channels=w_out.shape[0], model_channels=w_in.shape[0],
        channel_mult=multiples(widths, w_in.shape[0], what), num_res_blocks=num_res_blocks,
        attention_levels=attention_levels, mid_attention=mid_attention, num_heads=fam.num_heads, head_dim=fam.head_dim,
        transformer_depth=depth, linear_projection=linear, context_dim=context_dim, norm_groups=fam.norm_groups,
        norm_eps=SD_NORM_EPS,
    )


def unet_config_from_diffusers(state: dict[str, torch.Tensor], family: str | Family = "sd1") -> UNetConfig:
    """The UNetConfig that a diffusers UNet2DConditionModel state dict was built from."""
    what = "diffusers U-Net weights"
    levels = count_indices(state, "down_blocks.")
    widths = [require(state, f"down_blocks.{lv}.resnets.0.conv1.weight", what).shape[0] for lv in range(levels)]
    attention = tuple(lv for lv in range(levels) if f"down_blocks.{lv}.attentions.0.norm.weight" in state)
    return _unet_config(state, "conv_in.weight", "conv_out.weight", widths, count_indices(state, "down_blocks.0.resnets."),
                        attention, "mid_block.attentions.0.norm.weight" in state, family, what)


def unet_config_from_compvis(state: dict[str, torch.Tensor], family: str | Family = "sd1") -> UNetConfig:
    """The UNetConfig of SD's original U-Net keys (without the `model.diffusion_model.` prefix)."""
    what = "SD U-Net weights"
    # Walk input_blocks 1..: each ResBlock adds to the current level, each downsampler opens the next.
    res_widths: list[list[int]] = [[]]
    attention: list[int] = []
    for i in range(1, count_indices(state, "input_blocks.")):
        if f"input_blocks.{i}.0.op.weight" in state:
            res_widths.append([])
            continue
        res_widths[-1].append(require(state, f"input_blocks.{i}.0.in_layers.2.weight", what).shape[0])
        if f"input_blocks.{i}.1.norm.weight" in state and len(res_widths) - 1 not in attention:
            attention.append(len(res_widths) - 1)
    counts = {len(level) for level in res_widths}
    if len(counts) != 1 or 0 in counts:
        raise WeightsError(f"{what}: ResBlocks per level {[len(lv) for lv in res_widths]} are not one positive number")
    return _unet_config(state, "input_blocks.0.0.weight", "out.2.weight", [lv[0] for lv in res_widths], counts.pop(),
                        tuple(attention), "middle_block.1.norm.weight" in state, family, what)
