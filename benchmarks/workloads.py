"""What the benchmark runs: the model config, the sizes of each workload, and the step functions of
(a) training and (b) sampling, the same for both sides apart from how each library's U-Net is called."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from diffusion.config import PipelineConfig, apply_overrides, from_dict, load_yaml
from diffusion.train.optim import adamw

CONFIG = Path(__file__).with_name("unet_bench.yaml")
PROMPTS = ["a red circle in the top left", "a blue square in the center",
           "a yellow triangle in the bottom right", "a white circle in the top right"]
# --quick: the same code paths on a model small enough for the test suite.
QUICK_OVERRIDES = [
    "unet.model_channels=32", "unet.channel_mult=[1, 2]", "unet.num_res_blocks=1", "unet.attention_levels=[0]",
    "unet.num_heads=4", "unet.context_dim=64", "unet.norm_groups=8",
    "text_encoder.width=64", "text_encoder.layers=1", "text_encoder.context_length=16",
    "vae.channels=16", "vae.channel_mult=[1, 2]", "vae.num_res_blocks=1", "vae.norm_groups=8",
    "info.resolution=16",
]


@dataclass
class Sizes:
    train_batch: int = 16
    sample_batch: int = 8
    images: int = 4
    steps: int = 50
    guidance: float = 7.5
    repeats: int = 5
    warmup: int = 2
    # Short workloads run more rounds, until both sides' times add up to this (at most max_repeats).
    min_seconds: float = 30.0
    max_repeats: int = 25


QUICK_SIZES = Sizes(train_batch=2, sample_batch=2, images=1, steps=2, repeats=2, warmup=1, min_seconds=0.0)


def load_bench_config(quick: bool) -> PipelineConfig:
    return from_dict(PipelineConfig, apply_overrides(load_yaml(CONFIG), QUICK_OVERRIDES if quick else []))


def call_for(side: str, unet: torch.nn.Module) -> Callable:
    """unet(x, t, context) -> eps for either library."""
    if side == "ours":
        return unet
    return lambda x, t, context: unet(x, t, encoder_hidden_states=context, return_dict=False)[0]


def unet_inputs(batch: int, cfg: PipelineConfig, device, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(0)
    side = cfg.info.resolution // cfg.vae.factor
    x = torch.randn(batch, cfg.unet.in_channels, side, side, generator=g).to(device, memory_format=memory_format)
    t = torch.randint(0, cfg.schedule.num_train_timesteps, (batch,), generator=g).to(device)
    context = torch.randn(batch, cfg.text_encoder.context_length, cfg.unet.context_dim, generator=g).to(device)
    noise = torch.randn(x.shape, generator=g).to(device, memory_format=memory_format)
    return x, t, context, noise


# Each side's AdamW as its training script builds it: ours is train.py's (diffusion.train.optim.adamw,
# PyTorch's fused kernel), diffusers' is train_text_to_image.py's (torch.optim.AdamW's defaults).
# The same update rule and hyperparameters; only the implementation differs.
OPTIMIZERS = {"ours": adamw, "diffusers": torch.optim.AdamW}


def make_train_step(side, unet, call, batch, cfg, device, memory_format=torch.contiguous_format) -> Callable:
    """(a): one ε-prediction training step in fp32, AdamW with SD's defaults (lr 1e-4, wd 1e-2)."""
    unet.train()
    x, t, context, noise = unet_inputs(batch, cfg, device, memory_format)
    opt = OPTIMIZERS[side](unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    def step():
        opt.zero_grad(set_to_none=True)
        F.mse_loss(call(x, t, context), noise).backward()
        opt.step()

    return step


def make_sample_step(call, batch, cfg, device, autocast_dtype=None, memory_format=torch.contiguous_format) -> Callable:
    """(b): one no-grad forward, optionally under autocast."""
    x, t, context, _ = unet_inputs(batch, cfg, device, memory_format)

    def step():
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return call(x, t, context)

    return step
