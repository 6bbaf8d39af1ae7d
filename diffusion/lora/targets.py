"""Where each layer that a LoRA file can name sits in our models.

LoRA files name layers as diffusers (U-Net) and transformers (CLIP text model) name them. Our
attention fuses q, k, v (a cross-attention's k, v; CLIP's in_proj) into one weight, so such a layer
is a block of rows of one of our weights. The table is derived from the same links that load SD's
weights (diffusion/io), so every layer those layouts have is covered, and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..io.sd_keymap import count_indices
from ..io.sd_text import BLOCKS, HF_PREFIX, hf_links
from ..io.sd_unet import unet_links

COMPONENTS = ("unet", "text_encoder")

# lora.targets -> the layers it adapts, by their SD names. Kohya's default LoRA adapts the U-Net's
# attention; LoCon adds the ResBlocks' and resamplers' convolutions.
GROUPS: dict[str, tuple[str, re.Pattern]] = {
    "attn": ("unet", re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")),
    "cross_attn": ("unet", re.compile(r"\.attn2\.(to_q|to_k|to_v|to_out\.0)$")),
    "proj": ("unet", re.compile(r"\.(proj_in|proj_out)$")),
    "ff": ("unet", re.compile(r"\.ff\.net\.(0\.proj|2)$")),
    "conv": ("unet", re.compile(r"(\.resnets\.\d+\.(conv1|conv2|conv_shortcut)|samplers\.0\.conv)$")),
    "text_attn": ("text_encoder", re.compile(r"\.self_attn\.(q|k|v|out)_proj$")),
    "text_mlp": ("text_encoder", re.compile(r"\.mlp\.fc[12]$")),
}


@dataclass(frozen=True)
class Target:
    """One adaptable layer: its SD name, and the rows of our weight that it is."""

    component: str  # "unet" or "text_encoder"
    name: str  # diffusers / transformers module path, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    param: str  # our parameter, e.g. "down.1.attn.blocks.0.attn1.to_qkv.weight"
    rows: tuple[int, int]  # [start, stop) of param's rows
    shape: tuple[int, ...]  # the layer's own weight shape: (out, in) or (out, in, kh, kw)

    @property
    def module(self) -> str:
        return self.param.rpartition(".")[0]

    @property
    def param_name(self) -> str:
        return self.param.rpartition(".")[2]


def _adaptable(module: nn.Module, param_name: str) -> bool:
    """Linear and conv weights, and nn.MultiheadAttention's fused input projection; not norms or embeddings."""
    if param_name == "in_proj_weight":
        return isinstance(module, nn.MultiheadAttention)
    return param_name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d))


def _from_links(component: str, model: nn.Module, links) -> list[Target]:
    modules = dict(model.named_modules())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    targets = []
    for link in links:
        module, _, param_name = link.native.rpartition(".")
        if not _adaptable(modules[module], param_name):
            continue
        shape = shapes[link.native]
        rows = shape[0] // len(link.sources)
        for i, source in enumerate(link.sources):
            name = source.rpartition(".")[0]  # "...attn1.to_q.weight" -> "...attn1.to_q"
            targets.append(Target(component, name, link.native, (i * rows, (i + 1) * rows), (rows, *shape[1:])))
    return targets


def unet_targets(unet: nn.Module) -> list[Target]:
    links, _ = unet_links(unet.cfg, "diffusers")
    return _from_links("unet", unet, links)


def text_targets(text_encoder: nn.Module) -> list[Target]:
    state = text_encoder.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return _from_links("text_encoder", text_encoder, hf_links(shapes, count_indices(state, BLOCKS), HF_PREFIX))


def pipeline_targets(pipe) -> list[Target]:
    """Every adaptable layer of a pipeline's U-Net and text encoder (worked out once per pipeline: it builds
    the U-Net's layout on the meta device, which would cost every change of adapters a fraction of a second)."""
    if getattr(pipe, "_lora_targets", None) is None:
        pipe._lora_targets = unet_targets(pipe.unet) + text_targets(pipe.text_encoder)
    return pipe._lora_targets


def select(targets: list[Target], groups: tuple[str, ...]) -> list[Target]:
    """The targets that lora.targets names (see GROUPS)."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown lora.targets entry '{unknown[0]}'; choose from {', '.join(GROUPS)}")
    picked = [t for t in targets if any(GROUPS[g][0] == t.component and GROUPS[g][1].search(t.name) for g in groups)]
    return picked
