"""Typed configs for every component, loaded from YAML with dotted command-line overrides.

YAML holds data only. Every key maps onto a dataclass field; an unknown key is an error that
names the key and lists the valid ones, so a typo never goes unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from .config_io import ConfigError, apply_overrides, from_dict, load_yaml, save_config, to_dict  # noqa: F401 - the config API
from .errors import UsageError



@dataclass
class VAEConfig:
    """KL autoencoder (LDM's AutoencoderKL). f = 2 ** (len(channel_mult) - 1)."""

    in_channels: int = 3
    latent_channels: int = 4
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    mid_attention: bool = True
    # The U-Net sees z * scale_factor. SD's VAE uses 0.18215; training sets 1/std(z).
    scale_factor: float = 0.18215

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass
class TextEncoderConfig:
    """open_clip text transformer: a named architecture, or a custom tower when arch is null."""

    arch: Optional[str] = None  # e.g. "ViT-B-32", "ViT-L-14"; null = the custom tower below
    pretrained: Optional[str] = None  # null, an open_clip pretrained tag, or a local weights file
    # Defaults are CLIP ViT-L/14's text tower, which SD v1 uses.
    width: int = 768
    layers: int = 12
    heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    layer: Literal["last", "penultimate"] = "last"
    trainable: bool = False
    # The MLP's nonlinearity; null: the architecture's own (gelu for the custom tower). SD v1's OpenAI
    # CLIP was trained with quick_gelu, SD v2's OpenCLIP with gelu.
    activation: Optional[Literal["gelu", "quick_gelu"]] = None
    # Width of the pooled embedding's projection; null: the architecture's own (width for the custom
    # tower); 0: no projection, as in Hugging Face's CLIPTextModel that SD's diffusers folders hold.
    embed_dim: Optional[int] = None
    # A Hugging Face tokenizer folder (vocab.json + merges.txt, or tokenizer.json); null: open_clip's
    # bundled CLIP vocabulary.
    tokenizer: Optional[str] = None
    # The id after the end token; null: the tokenizer folder's pad token, else 0 ("!", as open_clip and
    # SD v2 pad). SD v1 pads with <|endoftext|> (49407); the pad changes the image.
    pad_id: Optional[int] = None


@dataclass
class UNetConfig:
    """SD-style U-Net noise predictor: net(x_t, t, context) -> eps."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels (0 = highest resolution) with transformers
    mid_attention: bool = True
    num_heads: int = 8  # at every level, unless head_dim is set
    # Channels per head: a level of width C then has C // head_dim heads (SD 2.x: 64). null: num_heads.
    head_dim: Optional[int] = None
    transformer_depth: int = 1
    # Linear rather than 1x1-conv projections into and out of the transformers (SD 2.x).
    linear_projection: bool = False
    context_dim: int = 768
    norm_groups: int = 32
    # GroupNorm eps of the ResBlocks and the output norm; SD's U-Net uses 1e-5 (its transformers keep 1e-6).
    norm_eps: float = 1e-6
    dropout: float = 0.0
    gradient_checkpointing: bool = False

    def heads_at(self, width: int) -> int:
        """Attention heads of a transformer of this width."""
        return width // self.head_dim if self.head_dim else self.num_heads


@dataclass
class ScheduleConfig:
    """DDPM noise schedule over num_train_timesteps steps."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False
    # What the network predicts: the noise ε, or the velocity v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022).
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"


@dataclass
class SamplingConfig:
    """Generation defaults stored with a model."""

    sampler: str = "ddim"  # a name in diffusion/registry.py: "DPM++ 2M Karras" or its short form dpmpp_2m_karras
    steps: int = 50
    guidance: float = 7.5
    eta: float = 0.0
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"
    steps_offset: int = 1
    # DDIM's alpha_cumprod before the first step: 1 (diffusers' set_alpha_to_one) or alphas_cumprod[0] (SD).
    final_alpha_one: bool = False


@dataclass
class ShapesConfig:
    """Generate the built-in shapes dataset at data.path when it is missing."""

    generate: bool = False
    num: int = 2000
    seed: int = 0
    held_out: tuple[str, ...] = ()  # (color, shape) pairs kept out, e.g. "red circle"
    # Palette colors to draw, e.g. ["cyan"]; empty: the six default colors, which the quick start trains on
    # (cyan is left out of them so that a LoRA adapter can teach it later).
    colors: tuple[str, ...] = ()


@dataclass
class DataConfig:
    path: str = "data/shapes"
    resolution: int = 32
    crop: Literal["center", "random"] = "center"
    flip: bool = False
    caption_dropout: float = 0.1
    missing_caption: Literal["error", "empty", "skip"] = "error"
    min_size: int = 8  # images with a side below this are skipped
    num_workers: int = 0
    # Regularization images (kohya's reg_data_dir, DreamBooth's prior preservation): another image-caption
    # folder trained on beside data.path, so that an adapter or fine-tune learning something new keeps
    # what the base model did. reg_num: how many of its pairs (in sorted order); 0: all.
    reg_path: Optional[str] = None
    reg_num: int = 0
    # Aspect-ratio buckets (kohya): train each image in the (w, h) of about resolution² pixels nearest its shape,
    # batches from one bucket. Sides step by bucket_step (0: 8 latent pixels, 64 for SD) from bucket_min_side
    # (0: resolution/2) to bucket_max_side (0: 2·resolution). Off: every image is cropped to a square.
    buckets: bool = False
    bucket_min_side: int = 0
    bucket_max_side: int = 0
    bucket_step: int = 0
    # Shards (data.path a folder of .tar files or a pattern like shards/{00000..00099}.tar): samples each data
    # worker mixes in a seeded buffer before batching; 1 reads them in shard order.
    shuffle_buffer: int = 1000
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


@dataclass
class VAETrainingConfig:
    pretrained: Optional[str] = None  # an existing VAE (pipeline folder or weights file) skips the stage
    max_steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    # LDM's autoencoder setting: a short memory suits the PatchGAN term's moving target.
    adam_betas: tuple[float, float] = (0.5, 0.9)
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    rec_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6
    disc_start: int = -1  # step at which the PatchGAN term starts; -1 = never
    disc_weight: float = 0.5
    grad_clip: float = 1.0
    val_images: int = 16  # held back for reconstruction PSNR
    scale_samples: int = 256  # images whose latents set the scale factor (scale_by_std)
    checkpoint_every: int = 500
    # Probability of putting an image's RGB channels in another order: the VAE then also learns hues the
    # data lacks, which fine-tuning or a LoRA may bring later (the shapes model's cyan).
    color_shuffle: float = 0.0
    # Probability of turning an image's hue by a random angle: every hue, not only the channel orders'.
    hue_rotate: float = 0.0


@dataclass
class TrainingConfig:
    """The latent diffusion stage. Defaults follow SD v1 / diffusers' training script."""

    max_steps: int = 10000
    batch_size: int = 16
    lr: float = 1e-4
    # The trainable text encoder's own peak rate (kohya's --text_encoder_lr); None: the same as lr.
    text_encoder_lr: Optional[float] = None
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    warmup_steps: int = 500
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Autocast through Accelerate, on CPU as on GPU; auto: bf16 where the hardware has it (diffusion.devices).
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "no"
    # torch.compile (inductor) of the trained modules: the U-Net and text encoder here, the VAE and its
    # discriminator in the VAE stage; auto: on a GPU only (diffusion.devices has the CPU figures).
    compile: Literal["no", "yes", "auto"] = "no"
    # The trained modules' memory layout: channels_last (NHWC) or NCHW. auto: NCHW for fp32 on a CPU, where
    # oneDNN's convolution and GroupNorm backward passes ran faster in it; channels_last elsewhere (diffusion.devices).
    channels_last: Literal["no", "yes", "auto"] = "auto"
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    min_snr_gamma: Optional[float] = None
    offset_noise: float = 0.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validation_prompts: tuple[str, ...] = ()
    on_nonfinite: Literal["stop", "skip"] = "stop"
    cache_latents: bool = True
    log_every: int = 10
    # Every eval_every steps, score a fixed third of the shapes prompts with a cheap sampler (0: never).
    eval_every: int = 0
    tensorboard: bool = False


@dataclass
class ModelInfo:
    """What a saved model is, shown by the demo and written into image metadata."""

    name: str = "model"
    resolution: int = 32
    trained_on: str = ""
    example_prompts: tuple[str, ...] = ()
    held_out: tuple[str, ...] = ()  # shapes (color, shape) pairs never seen in training


@dataclass
class PipelineConfig:
    """Everything needed to rebuild a saved pipeline; stored as pipeline.yaml beside the weights."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    info: ModelInfo = field(default_factory=ModelInfo)


@dataclass
class PretrainedConfig:
    """A model to start from (fine-tuning): its architecture, schedule and sampling defaults replace the
    config's vae, text_encoder, unet, schedule and sampling sections, except text_encoder.trainable,
    unet.gradient_checkpointing and unet.dropout, which say how to train it."""

    pretrained: Optional[str] = None  # our model folder, a diffusers folder or an SD .safetensors file
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None  # for a single file (see sample.py --help)
    ema: Literal["auto", "on", "off"] = "auto"  # for a single file: its EMA weights or the raw ones


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021) trained on a frozen model.pretrained; rank 0 trains the model itself."""

    rank: int = 0
    alpha: Optional[float] = None  # ΔW = alpha/rank · B·A; null: alpha = rank (scale 1)
    # What to adapt: attn (the U-Net's self- and cross-attention q, k, v, out; kohya's and diffusers' default),
    # cross_attn (only the cross-attention, which reads the prompt), proj (the transformers' proj_in/out), ff
    # (their feed-forward), conv (ResBlock and resampler convolutions: LoCon), text_attn and text_mlp (the
    # text encoder's attention and MLP).
    targets: tuple[str, ...] = ("attn",)


@dataclass
class Config:
    name: str = "model"
    output_dir: str = "runs/model"
    seed: int = 0
    model: PretrainedConfig = field(default_factory=PretrainedConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vae_training: VAETrainingConfig = field(default_factory=VAETrainingConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self):
        validate(self)

    def pipeline_config(self, **info) -> PipelineConfig:
        return PipelineConfig(
            vae=self.vae,
            text_encoder=self.text_encoder,
            unet=self.unet,
            schedule=self.schedule,
            sampling=self.sampling,
            info=ModelInfo(name=self.name, resolution=self.data.resolution, held_out=self.data.shapes.held_out, **info),
        )


def check_text_layer(layer: str, blocks: int) -> None:
    """text_encoder.layer against a tower of `blocks` blocks: the penultimate layer needs one to stop before.

    TextEncoder checks it too, with the blocks it built, for an arch or a pipeline.yaml that validate never sees.
    """
    if layer == "penultimate" and blocks < 1:
        raise ConfigError("text_encoder.layer: penultimate needs a tower of at least one block; set it to last")


def validate(cfg: Config) -> None:
    """Cross-component checks that a single field's type cannot express."""
    from .registry import sampler

    try:
        sampler(cfg.sampling.sampler)
    except UsageError as e:
        raise ConfigError(f"sampling.sampler: {e}") from None
    if cfg.unet.in_channels != cfg.vae.latent_channels:
        raise ConfigError(
            f"unet.in_channels ({cfg.unet.in_channels}) must equal vae.latent_channels ({cfg.vae.latent_channels})"
        )
    if cfg.text_encoder.arch is None and cfg.unet.context_dim != cfg.text_encoder.width:
        raise ConfigError(
            f"unet.context_dim ({cfg.unet.context_dim}) must equal text_encoder.width ({cfg.text_encoder.width})"
        )
    if cfg.text_encoder.layers < 0:
        raise ConfigError(f"text_encoder.layers must be >= 0 (0: token and position embeddings only), got {cfg.text_encoder.layers}")
    check_text_layer(cfg.text_encoder.layer, cfg.text_encoder.layers)
    if cfg.data.resolution % cfg.vae.factor:
        raise ConfigError(f"data.resolution ({cfg.data.resolution}) must be divisible by the VAE factor {cfg.vae.factor}")
    validate_buckets(cfg)
    for name, p in (("data.caption_dropout", cfg.data.caption_dropout), ("vae_training.color_shuffle", cfg.vae_training.color_shuffle),
                    ("vae_training.hue_rotate", cfg.vae_training.hue_rotate)):
        if not 0 <= p <= 1:
            raise ConfigError(f"{name} is a probability: give a number from 0 to 1, got {p}")
    if cfg.data.shuffle_buffer < 1:
        raise ConfigError(f"data.shuffle_buffer must be >= 1 (1: no shuffling), got {cfg.data.shuffle_buffer}")
    if cfg.model.pretrained and cfg.vae_training.pretrained:
        raise ConfigError("model.pretrained brings its own VAE; leave vae_training.pretrained unset")
    if cfg.training.eval_every < 0:
        raise ConfigError(f"training.eval_every must be >= 0 (0 turns it off), got {cfg.training.eval_every}")
    if cfg.training.eval_every and not cfg.data.shapes.generate:
        raise ConfigError("training.eval_every scores the built-in shapes prompts; it needs data.shapes.generate: true")
    # Unknown colors, and held-out pairs outside them, fail at load time rather than when the data is made.
    from .data.shapes import parse_pair, resolve_colors

    shapes = cfg.data.shapes
    try:
        resolve_colors(shapes.colors)
    except ValueError as e:
        raise ConfigError(f"data.shapes.colors: {e}") from None
    try:
        for pair in shapes.held_out:
            parse_pair(pair, shapes.colors)
    except ValueError as e:
        raise ConfigError(f"data.shapes.held_out: {e}") from None
    validate_lora(cfg)
    bad_levels = [lvl for lvl in cfg.unet.attention_levels if not 0 <= lvl < len(cfg.unet.channel_mult)]
    if bad_levels:
        raise ConfigError(f"unet.attention_levels {bad_levels} out of range for {len(cfg.unet.channel_mult)} levels")


def validate_buckets(cfg: Config) -> None:
    """Bucket sides must survive the VAE's and the U-Net's downsampling: a multiple of their product."""
    d = cfg.data
    if min(d.bucket_min_side, d.bucket_max_side, d.bucket_step) < 0:
        raise ConfigError("data.bucket_min_side, bucket_max_side and bucket_step must be >= 0 (0: the default)")
    down = cfg.vae.factor * 2 ** (len(cfg.unet.channel_mult) - 1)
    if not d.buckets:
        return
    if d.bucket_step and d.bucket_step % down:
        raise ConfigError(f"data.bucket_step ({d.bucket_step}) must be a multiple of {down}: the VAE factor times the U-Net's downsampling")
    from .data.buckets import config_buckets
    from .errors import ToolkitError

    try:
        config_buckets(d, cfg.vae.factor)  # at load time, not after the VAE stage
    except ToolkitError as e:
        raise ConfigError(str(e)) from None


def validate_lora(cfg: Config) -> None:
    from .lora.targets import GROUPS

    lora = cfg.lora
    if lora.rank < 0 or (lora.alpha is not None and lora.alpha <= 0):
        raise ConfigError(f"lora.rank must be >= 0 (0: no adapters) and lora.alpha > 0, got {lora.rank} and {lora.alpha}")
    if not lora.rank:
        return
    if not cfg.model.pretrained:
        raise ConfigError("lora.rank trains adapters on a frozen base model: set model.pretrained=PATH (a model folder, diffusers folder or SD file)")
    if cfg.text_encoder.trainable:
        raise ConfigError("with lora.rank the base stays frozen: leave text_encoder.trainable false and add text_attn to lora.targets")
    unknown = [t for t in lora.targets if t not in GROUPS]
    if unknown or not lora.targets:
        raise ConfigError(f"lora.targets: unknown entry '{unknown[0] if unknown else ''}'; choose from {', '.join(GROUPS)}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a Config from YAML (or the defaults when path is None) plus dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(Config, apply_overrides(data, overrides))
