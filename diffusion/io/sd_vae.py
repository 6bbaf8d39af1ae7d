"""Stable Diffusion VAE weights in and out: diffusers' AutoencoderKL layout and the original
CompVis/Stability layout (the keys under `first_stage_model.` of a single-file checkpoint).

Pure and prefix-free, as sd_unet.py: the caller strips or adds `first_stage_model.`. Our VAE has
SD's structure (per level num_res_blocks ResBlocks in the encoder, one more in the decoder, a
single-head attention in each middle); our mid attention fuses q, k, v, and SD's original layout
stores those projections as 1x1 convs. The latent scale (0.18215 for SD 1.x and 2.x) is not in
the weights; the config default stands.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..config import VAEConfig
from ..models.vae import AutoencoderKL
from .sd_keymap import (
    PLAIN,
    Link,
    Table,
    count_indices,
    expand,
    from_native,
    link_modules,
    multiples,
    native_shapes,
    require,
    to_native,
)
from .weights import WeightsError

RES_DIFFUSERS: Table = {"norm1": ("norm1",), "conv1": ("conv1",), "norm2": ("norm2",), "conv2": ("conv2",), "skip": ("conv_shortcut",)}
RES_COMPVIS: Table = {**RES_DIFFUSERS, "skip": ("nin_shortcut",)}


def _diffusers_modules(cfg: VAEConfig) -> Iterator[tuple[str, str, Table]]:
    """Our modules beside diffusers'. Pairs for modules a config lacks match no tensor and drop out."""
    levels, nrb = len(cfg.channel_mult), cfg.num_res_blocks
    for side in ("encoder", "decoder"):
        yield from [(f"{side}.conv_in", f"{side}.conv_in", PLAIN), (f"{side}.norm_out", f"{side}.conv_norm_out", PLAIN)]
        yield f"{side}.conv_out", f"{side}.conv_out", PLAIN
        yield f"{side}.mid.0", f"{side}.mid_block.resnets.0", RES_DIFFUSERS
        yield f"{side}.mid.1", f"{side}.mid_block.attentions.0", {"norm": ("group_norm",), "attn.to_qkv": ("to_q", "to_k", "to_v"), "attn.to_out": ("to_out.0",)}
        yield f"{side}.mid.2", f"{side}.mid_block.resnets.1", RES_DIFFUSERS
    yield from [("quant_conv", "quant_conv", PLAIN), ("post_quant_conv", "post_quant_conv", PLAIN)]
    # Our encoder.blocks: per level nrb ResBlocks then a downsampler; decoder.blocks: nrb + 1, then an upsampler.
    for i in range(levels * (nrb + 1)):
        level, j = divmod(i, nrb + 1)
        yield f"encoder.blocks.{i}", f"encoder.down_blocks.{level}.resnets.{j}", RES_DIFFUSERS
        yield f"encoder.blocks.{i}.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv", PLAIN
    for i in range(levels * (nrb + 2)):
        block, j = divmod(i, nrb + 2)
        yield f"decoder.blocks.{i}", f"decoder.up_blocks.{block}.resnets.{j}", RES_DIFFUSERS
        yield f"decoder.blocks.{i}.conv", f"decoder.up_blocks.{block}.upsamplers.0.conv", PLAIN


def _compvis_modules(cfg: VAEConfig) -> Iterator[tuple[str, str, Table]]:
    """Our modules beside CompVis's. Its decoder numbers `up` by level, the reverse of the order it runs."""
    levels, nrb = len(cfg.channel_mult), cfg.num_res_blocks
    for side in ("encoder", "decoder"):
        for name in ("conv_in", "norm_out", "conv_out"):
            yield f"{side}.{name}", f"{side}.{name}", PLAIN
        yield f"{side}.mid.0", f"{side}.mid.block_1", RES_COMPVIS
        yield f"{side}.mid.1", f"{side}.mid.attn_1", {"norm": ("norm",)}  # its projections: see vae_links
        yield f"{side}.mid.2", f"{side}.mid.block_2", RES_COMPVIS
    yield from [("quant_conv", "quant_conv", PLAIN), ("post_quant_conv", "post_quant_conv", PLAIN)]
    for i in range(levels * (nrb + 1)):
        level, j = divmod(i, nrb + 1)
        yield f"encoder.blocks.{i}", f"encoder.down.{level}.block.{j}", RES_COMPVIS
        yield f"encoder.blocks.{i}.conv", f"encoder.down.{level}.downsample.conv", PLAIN
    for i in range(levels * (nrb + 2)):
        block, j = divmod(i, nrb + 2)
        yield f"decoder.blocks.{i}", f"decoder.up.{levels - 1 - block}.block.{j}", RES_COMPVIS
        yield f"decoder.blocks.{i}.conv", f"decoder.up.{levels - 1 - block}.upsample.conv", PLAIN


def vae_links(cfg: VAEConfig, layout: str) -> tuple[list[Link], dict[str, tuple[int, ...]]]:
    """Every tensor link between our AutoencoderKL(cfg) and `layout` ("diffusers" or "compvis"), and our shapes."""
    shapes = native_shapes(lambda: AutoencoderKL(cfg))
    if layout == "diffusers":
        return link_modules(shapes, _diffusers_modules(cfg)), shapes
    # CompVis's mid attention projections are 1x1 convs: linked apart from the plain renamings.
    projections = {"attn.to_qkv": ("q", "k", "v"), "attn.to_out": ("proj_out",)}
    convs = [link for side in ("encoder", "decoder")
             for link in expand(shapes, f"{side}.mid.1", f"{side}.mid.attn_1", projections, conv1x1=True)]
    rest = {k: v for k, v in shapes.items() if k not in {link.native for link in convs}}
    return link_modules(rest, _compvis_modules(cfg)) + convs, shapes


def vae_from_diffusers(state: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Our AutoencoderKL state dict from a diffusers AutoencoderKL state dict."""
    return to_native(state, *vae_links(cfg, "diffusers"), what="diffusers VAE weights")


def vae_to_diffusers(state: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict from ours."""
    return from_native(state, *vae_links(cfg, "diffusers"), what="VAE weights")


def vae_from_compvis(state: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Our AutoencoderKL state dict from SD's original keys (without the `first_stage_model.` prefix)."""
    return to_native(state, *vae_links(cfg, "compvis"), what="SD VAE weights")


def vae_to_compvis(state: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """SD's original VAE keys (without the `first_stage_model.` prefix) from ours."""
    return from_native(state, *vae_links(cfg, "compvis"), what="VAE weights")


def _vae_config(state, encoder_level: str, decoder_level: str, mid_attention: bool, norm_groups: int, what: str) -> VAEConfig:
    """The config from either layout; `encoder_level` / `decoder_level` format a level's ResBlock prefix."""
    conv_in = require(state, "encoder.conv_in.weight", what)
    levels = count_indices(state, encoder_level.split("{")[0])
    nrb = count_indices(state, encoder_level.format(level=0) + ".")
    decoder_nrb = count_indices(state, decoder_level.format(level=0) + ".")
    if decoder_nrb != nrb + 1:
        raise WeightsError(f"{what}: {nrb} ResBlocks per encoder level need {nrb + 1} per decoder level, found {decoder_nrb}")
    widths = [require(state, f"{encoder_level.format(level=lv)}.0.conv1.weight", what).shape[0] for lv in range(levels)]
    return VAEConfig(
        in_channels=conv_in.shape[1], latent_channels=require(state, "decoder.conv_in.weight", what).shape[1],
        channels=conv_in.shape[0], channel_mult=multiples(widths, conv_in.shape[0], what), num_res_blocks=nrb,
        norm_groups=norm_groups, mid_attention=mid_attention,
    )


def vae_config_from_diffusers(state: dict[str, torch.Tensor], norm_groups: int = 32) -> VAEConfig:
    """The VAEConfig of a diffusers AutoencoderKL state dict. GroupNorm's groups do not show in shapes (SD: 32)."""
    return _vae_config(state, "encoder.down_blocks.{level}.resnets", "decoder.up_blocks.{level}.resnets",
                       "encoder.mid_block.attentions.0.to_q.weight" in state, norm_groups, "diffusers VAE weights")


def vae_config_from_compvis(state: dict[str, torch.Tensor], norm_groups: int = 32) -> VAEConfig:
    """The VAEConfig of SD's original VAE keys (without `first_stage_model.`). SD's norms have 32 groups."""
    return _vae_config(state, "encoder.down.{level}.block", "decoder.up.{level}.block",
                       "encoder.mid.attn_1.q.weight" in state, norm_groups, "SD VAE weights")
