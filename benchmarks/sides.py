"""The two sides of the benchmark, built from one PipelineConfig: our Pipeline, and the standard
diffusers parts (UNet2DConditionModel, AutoencoderKL, DDIMScheduler) of the same sizes, with the
same CLIP text tower, run the way StableDiffusionPipeline runs them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import AutoencoderKL as HFAutoencoderKL
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from diffusion.config import PipelineConfig, UNetConfig, VAEConfig
from diffusion.pipeline import Pipeline

SIDES = ("ours", "diffusers")


def diffusers_unet_config(u: UNetConfig, sample_size: int) -> dict:
    """UNet2DConditionModel kwargs for the same architecture as our UNetConfig."""
    levels = range(len(u.channel_mult))
    return dict(
        sample_size=sample_size, in_channels=u.in_channels, out_channels=u.out_channels,
        block_out_channels=tuple(u.model_channels * m for m in u.channel_mult), layers_per_block=u.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if lvl in u.attention_levels else "DownBlock2D" for lvl in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if lvl in u.attention_levels else "UpBlock2D" for lvl in reversed(levels)),
        mid_block_type="UNetMidBlock2DCrossAttn" if u.mid_attention else None,
        cross_attention_dim=u.context_dim, norm_num_groups=u.norm_groups, transformer_layers_per_block=u.transformer_depth,
        attention_head_dim=u.num_heads,  # diffusers' misnomer: for this model it is the number of heads
    )


def diffusers_vae_config(v: VAEConfig) -> dict:
    n = len(v.channel_mult)
    return dict(
        in_channels=v.in_channels, out_channels=v.in_channels, latent_channels=v.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(v.channels * m for m in v.channel_mult), layers_per_block=v.num_res_blocks,
        norm_num_groups=v.norm_groups, mid_block_add_attention=v.mid_attention, scaling_factor=v.scale_factor,
    )


def no_zero_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Give zero-initialised layers small random weights, as training would: outputs then depend on
    every layer on both sides, and no branch is trivially zero."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.02)
    return module


def build_ours(cfg: PipelineConfig) -> Pipeline:
    torch.manual_seed(0)
    pipe = Pipeline(cfg)
    no_zero_weights(pipe.unet)
    return pipe


def build_diffusers_unet(cfg: PipelineConfig) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**diffusers_unet_config(cfg.unet, cfg.info.resolution // cfg.vae.factor))


@dataclass
class DiffusersSide:
    """What StableDiffusionPipeline holds, with our CLIP text tower in place of transformers'."""

    unet: UNet2DConditionModel
    vae: HFAutoencoderKL
    scheduler: DDIMScheduler
    tokenizer: Callable  # open_clip's SimpleTokenizer: prompts -> (B, L) ids
    text_tower: torch.nn.Module  # CLIP's TextTransformer in open_clip's layout: the very weights our TextEncoder runs
    image_processor: VaeImageProcessor


def build_diffusers(cfg: PipelineConfig, ours: Pipeline) -> DiffusersSide:
    s, d = cfg.schedule, cfg.sampling
    scheduler = DDIMScheduler(
        num_train_timesteps=s.num_train_timesteps, beta_schedule=s.beta_schedule, beta_start=s.beta_start,
        beta_end=s.beta_end, clip_sample=False, set_alpha_to_one=d.final_alpha_one, steps_offset=d.steps_offset,
        timestep_spacing=d.timestep_spacing,
    )
    unet = build_diffusers_unet(cfg).eval()
    return DiffusersSide(
        unet=unet, vae=HFAutoencoderKL(**diffusers_vae_config(cfg.vae)).eval(), scheduler=scheduler,
        tokenizer=ours.text_encoder.tokenizer, text_tower=ours.text_encoder.tower,
        image_processor=VaeImageProcessor(vae_scale_factor=cfg.vae.factor),
    )


def diffusers_encode(side: DiffusersSide, prompts: list[str], device) -> torch.Tensor:
    """CLIP's last hidden state after the final LayerNorm: what SD feeds its U-Net."""
    tower = side.text_tower
    x, attn_mask = tower._embeds(side.tokenizer(prompts).to(device))
    return tower.ln_final(tower.transformer(x, attn_mask=attn_mask))


@torch.no_grad()
def diffusers_generate(side: DiffusersSide, prompts, steps: int, guidance: float, image_size: int, device, dtype,
                       on_step=None):
    """StableDiffusionPipeline.__call__'s steps, for DDIM with classifier-free guidance."""
    # 1. Prompt and negative-prompt embeddings, batched uncond-first (encode_prompt).
    cond = diffusers_encode(side, prompts, device)
    uncond = diffusers_encode(side, [""] * len(prompts), device)
    embeds = torch.cat([uncond, cond]).to(dtype)
    # 2. Timesteps and the initial noise, one generator per image.
    side.scheduler.set_timesteps(steps, device=device)
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    side_len = image_size // side.image_processor.config.vae_scale_factor
    shape = (len(prompts), side.unet.config.in_channels, side_len, side_len)
    latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype) * side.scheduler.init_noise_sigma
    # 3. Denoising loop.
    for t in side.scheduler.timesteps:
        latent_in = side.scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = side.unet(latent_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
        noise_uncond, noise_cond = noise_pred.chunk(2)
        noise_pred = noise_uncond + guidance * (noise_cond - noise_uncond)
        latents = side.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step()
    # 4. VAE decode (fp32, as ours) and conversion to PIL images.
    image = side.vae.decode(latents.float() / side.vae.config.scaling_factor, return_dict=False)[0]
    return side.image_processor.postprocess(image, output_type="pil")
