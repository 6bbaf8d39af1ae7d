"""Tiny random pipelines with Stable Diffusion's real structure, built with diffusers and transformers (test-only
oracles; no downloads), saved as a diffusers folder and as an original-layout single file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffusion.config import TextEncoderConfig
from diffusion.io import sd_text
from diffusion.io.sd_formats import read_model
from diffusion.io.sd_unet import unet_to_compvis
from diffusion.io.sd_vae import vae_to_compvis
from diffusion.models.text import TextEncoder

SIZE = 64
# Widths that satisfy both families' head rules, so that a single file (which brings no config) reads back
# the architecture it was written from: SD 1.x 8 heads per level, SD 2.x heads of 64 channels.
UNET_WIDTHS, TEXT_WIDTH = (64, 128, 128, 128), 64
DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
FLAVOURS = {
    "sd1": dict(unet={"attention_head_dim": 8}, act="quick_gelu", pad="<|endoftext|>"),
    "sd2": dict(unet={"attention_head_dim": (1, 2, 2, 2), "use_linear_projection": True}, act="gelu", pad="!"),
}


def randomise(module: torch.nn.Module, seed: int, scale: float = 1.0) -> torch.nn.Module:
    """Every weight random and none zero, so that no mapping mistake hides behind a zero-initialised layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise if p.ndim == 1 else scale * noise / p[0].numel() ** 0.5)
    return module.eval()


def build_diffusers(flavour: str, tokenizer_dir: Path):
    import diffusers
    import transformers

    spec = FLAVOURS[flavour]
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 8, block_out_channels=UNET_WIDTHS, layers_per_block=2, cross_attention_dim=TEXT_WIDTH,
        down_block_types=DOWN, up_block_types=UP, **spec["unet"],
    )
    vae = diffusers.AutoencoderKL(
        sample_size=SIZE, block_out_channels=(32, 64, 64, 64), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=1, max_position_embeddings=77, hidden_act=spec["act"],
    ))
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return diffusers.StableDiffusionPipeline(
        vae=randomise(vae, 1), text_encoder=randomise(text, 2), tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=randomise(unet, 3, scale=0.5), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def sd_single_file(folder: Path, flavour: str, path: Path) -> None:
    """The diffusers folder as an original-layout checkpoint; SD 2.x's tower gets back the last block and the
    projection that diffusers' copy drops (a penultimate-layer encoder never uses them)."""
    cfg, states = read_model(folder)
    text = states["text_encoder"]
    if flavour == "sd2":
        full = TextEncoder(TextEncoderConfig(width=TEXT_WIDTH, layers=3, heads=1, embed_dim=TEXT_WIDTH))
        text = {**randomise(full, 4).state_dict(), **text}
    ckpt = {
        **{"model.diffusion_model." + k: v for k, v in unet_to_compvis(states["unet"], cfg.unet).items()},
        **{"first_stage_model." + k: v for k, v in vae_to_compvis(states["vae"], cfg.vae).items()},
        **sd_text.single_file_from_native(text, flavour),
    }
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(path))


def make_sd_model(flavour: str, root: Path):
    """Build the flavour's diffusers pipeline and write root/folder and root/model.safetensors; returns the pipeline."""
    vocab = sd_text.tokenizer_files(TextEncoder(TextEncoderConfig(width=32, layers=1, heads=4)))
    sd_text.write_tokenizer(dataclasses.replace(vocab, pad=FLAVOURS[flavour]["pad"]), root / "vocab", 77)
    torch.manual_seed(0)
    pipe = build_diffusers(flavour, root / "vocab")
    pipe.save_pretrained(root / "folder", safe_serialization=True)
    sd_single_file(root / "folder", flavour, root / "model.safetensors")
    return pipe
