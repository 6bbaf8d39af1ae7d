"""Our pipelines in the formats the field reads: a diffusers folder and a Stable Diffusion single file.

    write_diffusers_folder(pipe, root)   model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
    write_single_file(pipe, path)        model.diffusion_model.*, first_stage_model.*, cond_stage_model.*

Weights are renamed and split, never recomputed (sd_unet, sd_vae, sd_text), so reading an export back
gives the same bits. A diffusers folder carries the configs diffusers builds the same networks from. A
single file carries none, so ours also hold our whole pipeline config in their metadata, from which
sd_formats.read_single_file rebuilds any architecture, not only SD's. Neither format has a place for
the sampling defaults (steps, guidance, eta): diffusers takes them as call arguments.

What a format cannot express is refused before anything is written: in diffusers, a U-Net middle
without attention (its UNetMidBlock2D holds one ResBlock, ours two); in a single file, a tokenizer
other than CLIP's own vocabulary. diffusers' DDIMScheduler steps from t to t - T//N whatever the
spacing: our next timestep with leading spacing, and with trailing spacing when N divides T, but not
with linspace spacing, which is warned about.

A destination that exists is refused, never overwritten; everything is written under a temporary
name and renamed into place whole.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import PipelineConfig, SamplingConfig, ScheduleConfig, UNetConfig, VAEConfig, to_dict
from ..errors import ToolkitError, UsageError, warn
from .atomic import atomic_folder
from ..registry import sampler as sampler_spec
from .sd_formats import BETA_SCHEDULES, CONFIG_KEY, PREDICTION_KEY, UNET_PREFIX, VAE_PREFIX, ZERO_SNR_KEY
from .sd_text import save_diffusers_text, single_file_from_native
from .sd_unet import unet_to_compvis, unet_to_diffusers
from .sd_vae import vae_to_compvis, vae_to_diffusers
from .weights import save_weights

if TYPE_CHECKING:
    from ..pipeline import Pipeline

# Written as every config's _diffusers_version: the first release whose AutoencoderKL reads mid_block_add_attention.
DIFFUSERS_FORMAT = "0.30.0"
WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_BETAS = {ours: theirs for theirs, ours in BETA_SCHEDULES.items()}


class ExportError(ToolkitError, ValueError):
    """A model the asked format cannot hold, or a destination that already exists; nothing is written."""


class BadDestination(ExportError, UsageError):
    """A destination the format cannot be written to (exit 2)."""


def check_destination(path: str | Path, single_file: bool) -> None:
    """Refuse a destination that exists (it is never overwritten), and a single file not named .safetensors,
    which is how readers tell safetensors from pickles."""
    path = Path(path)
    if single_file and path.suffix != ".safetensors":
        raise BadDestination(f"{path}: a single file is written as .safetensors; name it <model>.safetensors")
    if path.exists() or path.is_symlink():
        raise ExportError(f"{path} already exists; name a new destination (nothing was written)")


# ----------------------------------------------------------------------------- diffusers folders


def unet_diffusers_config(cfg: UNetConfig, sample_size: int) -> dict:
    """UNet2DConditionModel's config.json for UNet(cfg). Its `attention_head_dim` counts heads per level (a
    historical misnomer): one number for a fixed count, a list when heads are head_dim channels wide."""
    if not cfg.mid_attention:
        raise ExportError("diffusers' UNet2DConditionModel cannot hold a U-Net middle without attention "
                          "(its UNetMidBlock2D has one ResBlock, ours two); export --to single-file or native")
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    attends = [level in cfg.attention_levels for level in range(len(widths))]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_FORMAT,
        "sample_size": sample_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks, "downsample_padding": 1,
        "act_fn": "silu", "norm_num_groups": cfg.norm_groups, "norm_eps": cfg.norm_eps, "dropout": cfg.dropout,
        "cross_attention_dim": cfg.context_dim, "transformer_layers_per_block": cfg.transformer_depth,
        "attention_head_dim": [cfg.heads_at(w) for w in widths] if cfg.head_dim else cfg.num_heads,
        "use_linear_projection": cfg.linear_projection,
    }


def vae_diffusers_config(cfg: VAEConfig, sample_size: int) -> dict:
    """AutoencoderKL's config.json for our AutoencoderKL(cfg), with our latent scale as its scaling_factor."""
    widths = [cfg.channels * m for m in cfg.channel_mult]
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_FORMAT,
        "in_channels": cfg.in_channels, "out_channels": cfg.in_channels, "latent_channels": cfg.latent_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths), "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks, "act_fn": "silu",
        "norm_num_groups": cfg.norm_groups, "mid_block_add_attention": cfg.mid_attention,
        "sample_size": sample_size, "scaling_factor": cfg.scale_factor, "force_upcast": True,
    }


def scheduler_config(schedule: ScheduleConfig, sampling: SamplingConfig) -> dict:
    """The config of the diffusers scheduler that samples as our sampler does: our training schedule and its stepping rules."""
    class_name, options = sampler_spec(sampling.sampler).diffusers
    if class_name == "DDIMScheduler" and sampling.timestep_spacing == "linspace":
        warn("diffusers' DDIMScheduler steps from t to t - T//N, not to the next linspace timestep as we do; "
             "its images will differ from ours")
    return {
        "_class_name": class_name, "_diffusers_version": DIFFUSERS_FORMAT, **options,
        "num_train_timesteps": schedule.num_train_timesteps, "beta_schedule": DIFFUSERS_BETAS[schedule.beta_schedule],
        "beta_start": schedule.beta_start, "beta_end": schedule.beta_end, "trained_betas": None,
        "prediction_type": schedule.prediction_type, "rescale_betas_zero_snr": schedule.zero_terminal_snr,
        "timestep_spacing": sampling.timestep_spacing, "steps_offset": sampling.steps_offset,
        "set_alpha_to_one": sampling.final_alpha_one, "clip_sample": False,
    }


def model_index(scheduler_class: str) -> dict:
    """model_index.json of a StableDiffusionPipeline without a safety checker."""
    return {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_FORMAT,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler_class], "tokenizer": ["transformers", "CLIPTokenizer"],
        # CLIPTextModel even for a tower with a pooled projection: the pipeline conditions on output 0, which
        # CLIPTextModelWithProjection makes the pooled embedding. The projection's tensor stays in the weights
        # (transformers reports it unexpected and skips it), so that reading the folder back keeps it.
        "text_encoder": ["transformers", "CLIPTextModel"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False,
    }


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_diffusers_folder(pipe: Pipeline, root: str | Path) -> None:
    """Write `pipe` as a diffusers StableDiffusionPipeline folder at `root`, which must not exist yet."""
    root, cfg = Path(root), pipe.cfg
    check_destination(root, single_file=False)
    # Everything that can be refused is built before the folder is started.
    configs = {"unet": unet_diffusers_config(cfg.unet, cfg.info.resolution // pipe.vae_factor),
               "vae": vae_diffusers_config(cfg.vae, cfg.info.resolution)}
    weights = {"unet": unet_to_diffusers(pipe.unet.state_dict(), cfg.unet),
               "vae": vae_to_diffusers(pipe.vae.state_dict(), cfg.vae)}
    scheduler = scheduler_config(cfg.schedule, cfg.sampling)
    with atomic_folder(root, replace=False) as tmp:
        _write_json(tmp / "model_index.json", model_index(scheduler["_class_name"]))
        for name in ("unet", "vae"):
            _write_json(tmp / name / "config.json", configs[name])
            save_weights(weights[name], tmp / name / WEIGHTS)
        _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
        save_diffusers_text(pipe.text_encoder, tmp)


# ----------------------------------------------------------------------------- single files


def single_file_state(pipe: Pipeline) -> dict[str, torch.Tensor]:
    """Our weights in SD's original layout. The text encoder goes in SD 1's Hugging Face layout when it
    computes as SD 1's does (quick_gelu, last layer), else in SD 2's open_clip layout, so that a reader
    without our config infers the right activation and layer for SD-like models."""
    cfg, encoder = pipe.cfg, pipe.text_encoder
    layout = "sd1" if encoder.activation == "quick_gelu" and cfg.text_encoder.layer == "last" else "sd2"
    return {
        **{UNET_PREFIX + k: v for k, v in unet_to_compvis(pipe.unet.state_dict(), cfg.unet).items()},
        **{VAE_PREFIX + k: v for k, v in vae_to_compvis(pipe.vae.state_dict(), cfg.vae).items()},
        **single_file_from_native(encoder.state_dict(), layout),
    }


def _clip_vocabulary(tokenizer) -> bool:
    """Whether a tokenizer's ids and merges are CLIP's (open_clip's bundled vocabulary), whatever it names its
    start and end tokens: a single file carries no tokenizer, so it can only mean that one."""
    from ..models.tokenizer import DEFAULT_CONTEXT_LENGTH, FolderTokenizer, bundled_tokenizer

    if not isinstance(tokenizer, FolderTokenizer):
        return True

    def tables(tok) -> tuple:
        special = (tok.sot_token_id, tok.eot_token_id)
        return special, {t: i for t, i in tok.encoder.items() if i not in special}, tok.bpe_ranks

    return tables(tokenizer) == tables(bundled_tokenizer(DEFAULT_CONTEXT_LENGTH))


def single_file_config(pipe: Pipeline) -> PipelineConfig:
    """The config a single file records: the text encoder on CLIP's bundled vocabulary with its pad id written out."""
    encoder = pipe.text_encoder
    if not _clip_vocabulary(encoder.tokenizer):
        raise ExportError("a single file carries no tokenizer, and this model's vocabulary is not CLIP's; "
                          "export --to diffusers or native, which keep the tokenizer")
    text = dataclasses.replace(pipe.cfg.text_encoder, pretrained=None, tokenizer=None, pad_id=encoder.pad_id)
    return dataclasses.replace(pipe.cfg, text_encoder=text)


def write_single_file(pipe: Pipeline, path: str | Path) -> None:
    """Write `pipe` as an SD single-file checkpoint at `path` (a new .safetensors file), our config in its metadata."""
    path = Path(path)
    check_destination(path, single_file=True)
    cfg = single_file_config(pipe)
    metadata = {
        PREDICTION_KEY: cfg.schedule.prediction_type,
        ZERO_SNR_KEY: str(cfg.schedule.zero_terminal_snr).lower(),
        CONFIG_KEY: json.dumps(to_dict(cfg)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(single_file_state(pipe), path, metadata)
