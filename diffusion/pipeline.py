"""The text-to-image pipeline: VAE + text encoder + U-Net + noise schedule, saved as one folder.

    model/
      pipeline.yaml               PipelineConfig: every component's config, sampling defaults, model info
      vae.safetensors
      text_encoder.safetensors
      unet.safetensors

`generate()` is the one generation path: sample.py and app.py both call it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .errors import ToolkitError, UsageError, warn
from .config import ConfigError, PipelineConfig, from_dict, load_yaml, save_config
from .infotext import GenerationParams, attach
from . import registry
from .samplers import classifier_free_guidance, epsilon_from_v
from .schedule import NoiseSchedule, inference_timesteps
from .models.text import TextEncoder
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .io.atomic import atomic_folder
from .io.weights import WeightsError, load_state_dict_checked, load_weights_file, save_weights

CONFIG_FILE = "pipeline.yaml"
TOKENIZER_DIR = "tokenizer"
COMPONENTS = ("vae", "text_encoder", "unet")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class PipelineError(ToolkitError, ValueError):
    """A model folder that cannot be loaded, or generation arguments that are out of range."""


class BadRequest(PipelineError, UsageError):
    """A generation argument out of range: a bad flag for the command line (exit 2), a visible error in the app."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def image_grid(images: list[Image.Image], cols: int = 4) -> Image.Image:
    """Paste equally sized images into rows of `cols`."""
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (min(cols, len(images)) * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


class Pipeline:
    def __init__(
        self,
        cfg: PipelineConfig,
        vae: AutoencoderKL | None = None,
        text_encoder: TextEncoder | None = None,
        unet: UNet | None = None,
    ):
        self.cfg = cfg
        self.vae = vae if vae is not None else AutoencoderKL(cfg.vae)
        self.text_encoder = text_encoder if text_encoder is not None else TextEncoder(cfg.text_encoder)
        self.unet = unet if unet is not None else UNet(cfg.unet)
        if self.text_encoder.width != cfg.unet.context_dim:
            raise ConfigError(
                f"unet.context_dim ({cfg.unet.context_dim}) must equal the text encoder's width ({self.text_encoder.width})"
            )
        self.schedule = NoiseSchedule(cfg.schedule)
        if cfg.schedule.zero_terminal_snr and cfg.schedule.prediction_type == "epsilon":
            warn("zero terminal SNR with an ε-prediction model: at the last timestep ε says nothing about the image, "
                 "so samplers step from ᾱ = 2⁻²⁴ there; Lin et al. 2024 pair zero SNR with v-prediction")
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.model_hash = ""
        self.loras: list = []  # adapters merged into the weights (lora.merge.Applied), for the infotext
        self.lora_base: dict = {}  # the base weights that adapters changed, kept to restore them exactly
        for module in self.modules():
            module.eval()

    def modules(self):
        return (self.vae, self.text_encoder, self.unet)

    @property
    def vae_factor(self) -> int:
        return self.cfg.vae.factor

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> "Pipeline":
        """Move to a device and dtype. The VAE stays fp32: it is cheap and fp16 decodes can overflow to NaN."""
        self.device = torch.device(device) if device is not None else default_device()
        if isinstance(dtype, str):
            dtype = DTYPES[dtype]
        self.dtype = dtype or torch.float32
        self.vae.to(self.device, torch.float32)
        self.text_encoder.to(self.device, self.dtype)
        self.unet.to(self.device, self.dtype)
        self.schedule = self.schedule.to(self.device)
        return self

    def set_loras(self, stack: list) -> None:
        """Merge [(LoRA, multiplier), ...] into the weights, replacing any adapters applied before ([]: none)."""
        from .lora.merge import apply_loras

        if [(lora.name, lora.hash, m) for lora, m in stack] != [(a.name, a.hash, a.multiplier) for a in self.loras] or any(
            not lora.hash for lora, _ in stack
        ):
            apply_loras(self, stack)

    def compile(self, batch_size: int = 1, sampler: str | None = None, guidance: float | None = None,
                height: int | None = None, width: int | None = None) -> None:
        """torch.compile the U-Net in place, then warm it up: one 2-step generation of batch_size images
        (with these settings, else the model's defaults), so that the first request of that shape runs compiled code.

        Shapes are static: each new batch size or resolution compiles once more on first use, and a
        size's kernels do not depend on which sizes came before, so --from-png stays pixel-exact
        between compiled runs. Compiled kernels round differently from eager ones, so an image made
        eagerly regenerates exactly only eagerly.
        """
        import torch._dynamo

        from .devices import compiler_missing, quiet_compiler

        if problem := compiler_missing(self.device):
            raise PipelineError(f"--compile: {problem}, or leave out --compile")
        quiet_compiler()
        # The demo's 1-8 images, with and without guidance, at several sizes: more graphs than the default 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.unet.compile(dynamic=False)
        self.generate([""] * batch_size, steps=2, batch_size=batch_size, sampler=sampler, guidance=guidance, height=height, width=width)

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | Path) -> None:
        """Write the folder atomically: build it beside the target, then swap it in."""
        # The weights live in this folder now, so the saved config must not point at a download tag, and a
        # tokenizer folder (from a diffusers model) is copied in and named relative to the model.
        text_cfg = dataclasses.replace(self.cfg.text_encoder, pretrained=None)
        with atomic_folder(path) as tmp:
            if text_cfg.tokenizer is not None:
                from .io.sd_text import tokenizer_files, write_tokenizer

                write_tokenizer(tokenizer_files(self.text_encoder), tmp / TOKENIZER_DIR, self.text_encoder.context_length)
                text_cfg = dataclasses.replace(text_cfg, tokenizer=TOKENIZER_DIR)
            save_config(dataclasses.replace(self.cfg, text_encoder=text_cfg), tmp / CONFIG_FILE)
            for name in COMPONENTS:
                save_weights(getattr(self, name), tmp / f"{name}.safetensors")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> "Pipeline":
        path = Path(path)
        if not path.is_dir():
            raise PipelineError(f"model folder not found: {path}")
        if not is_model_dir(path):
            raise PipelineError(f"{path} is not a model folder (no {CONFIG_FILE}); point at the 'model' folder a training run exports")
        cfg = from_dict(PipelineConfig, load_yaml(path / CONFIG_FILE))
        if cfg.text_encoder.tokenizer is not None:  # saved relative to the model folder
            cfg = dataclasses.replace(cfg, text_encoder=dataclasses.replace(cfg.text_encoder, tokenizer=str(path / cfg.text_encoder.tokenizer)))
        pipe = cls(cfg)
        for name in COMPONENTS:
            file = path / f"{name}.safetensors"
            if not file.is_file():
                raise PipelineError(f"{path} is missing {file.name}")
            load_state_dict_checked(getattr(pipe, name), load_weights_file(file), what=str(file))
        pipe.model_hash = file_hash(path / "unet.safetensors")
        return pipe.to(device, dtype)

    @classmethod
    def from_states(cls, cfg: PipelineConfig, states: dict[str, dict[str, torch.Tensor]], name: str) -> "Pipeline":
        """A pipeline built from cfg, with each component's native state dict checked and loaded."""
        pipe = cls(cfg)
        for component in COMPONENTS:
            load_state_dict_checked(getattr(pipe, component), states[component], what=f"{name} ({component})")
        return pipe

    # ------------------------------------------------------------------ generation

    def check_args(self, steps: int, guidance: float, eta: float, height: int, width: int, sampler: str) -> None:
        """Raise PipelineError with a one-line fix for any out-of-range argument."""
        f = self.vae_factor
        try:
            registry.sampler(sampler)
        except UsageError as e:
            raise BadRequest(str(e)) from None
        if not 1 <= steps <= self.cfg.schedule.num_train_timesteps:
            raise BadRequest(f"steps must be between 1 and {self.cfg.schedule.num_train_timesteps}, got {steps}")
        if guidance < 0:
            raise BadRequest(f"guidance must be >= 0, got {guidance}")
        if not 0.0 <= eta <= 1.0:
            raise BadRequest(f"eta must be in [0, 1], got {eta}")
        if height < f or width < f or height % f or width % f:
            raise BadRequest(f"height and width must be positive multiples of the VAE factor {f}, got {height}x{width}")

    @torch.inference_mode()  # no autograd bookkeeping at all: ~5% of a small model's step
    def generate(
        self,
        prompts: str | list[str],
        negative_prompt: str = "",
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 8,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """One image per prompt; image i uses seed + i whatever the batch size.

        Unset arguments take the defaults stored with the model. Each returned image carries its
        generation parameters in image.info (see infotext.save_png). `progress(done, total)` is
        called after every denoising step.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        d = self.cfg.sampling
        steps, guidance = d.steps if steps is None else steps, d.guidance if guidance is None else guidance
        sampler, eta = sampler or d.sampler, d.eta if eta is None else eta
        # `is None`, not `or`: an explicit 0 must reach check_args and be rejected, not become the default.
        res = self.cfg.info.resolution
        height, width = res if height is None else height, res if width is None else width
        self.check_args(steps, guidance, eta, height, width, sampler)
        sampler = registry.sampler(sampler).key  # "DPM++ 2M Karras" and dpmpp_2m_karras alike

        timesteps = inference_timesteps(self.cfg.schedule.num_train_timesteps, steps, d.timestep_spacing, d.steps_offset)
        latent_shape = (self.cfg.vae.latent_channels, height // self.vae_factor, width // self.vae_factor)
        # The unconditional (or negative-prompt) embedding is the same for every batch and step.
        uncond = self.text_encoder.encode([negative_prompt]).to(self.dtype) if guidance != 1.0 else None
        images: list[Image.Image] = []
        total = len(prompts) * steps
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]

            def callback(i, t, x_t, _base=start * steps, _n=len(chunk)):
                if progress is not None:  # counts image-steps, so it reaches `total` whatever the batch size
                    progress(_base + (i + 1) * _n, total)

            z0 = self._sample_batch(chunk, seed + start, uncond, guidance, sampler, timesteps.to(self.device), eta, latent_shape, callback)
            x = self.decode(z0)
            if not (torch.isfinite(z0).all() and torch.isfinite(x).all()):  # no black or noise PNG for an overflow
                hint = "generate in fp32 (--dtype fp32)" if self.dtype != torch.float32 else "the model's weights may be damaged"
                raise PipelineError(f"generation produced non-finite values at seed {seed + start} ({str(self.dtype)[6:]}); {hint}")
            images += to_pil(x)
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            attach(image, GenerationParams(
                prompt=prompt, negative_prompt=negative_prompt, steps=steps, sampler=sampler, guidance=guidance,
                seed=seed + i, height=height, width=width, eta=eta, model_name=self.cfg.info.name, model_hash=self.model_hash,
                batch_size=min(batch_size, len(prompts) - i // batch_size * batch_size), batch_pos=i % batch_size,
                loras=tuple((a.name, a.multiplier, a.hash) for a in self.loras),
            ))
        return images

    def _sample_batch(self, prompts: list[str], first_seed: int, uncond, guidance: float, sampler: str,
                      timesteps: torch.Tensor, eta: float, latent_shape: tuple[int, int, int], callback) -> torch.Tensor:
        """Denoised latents z0 (B, C, h, w) for one batch; image i starts from the noise of seed first_seed + i."""
        # CPU generators, so that a seed gives the same noise on every device and batch size.
        generators = [torch.Generator().manual_seed(first_seed + i) for i in range(len(prompts))]
        x_T = torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(self.device, self.dtype)
        context = self.text_encoder.encode(prompts).to(self.dtype)  # (B, L, D)
        uncond_b = uncond.expand(len(prompts), -1, -1) if uncond is not None else None
        model = classifier_free_guidance(self.unet, context, uncond_b, guidance, prepare=self.unet.prepare_context)
        abar = self.schedule.alphas_cumprod
        if self.cfg.schedule.prediction_type == "v_prediction":
            model = epsilon_from_v(model, abar)
        spec = registry.sampler(sampler)
        options = dict(spec.options)
        if spec.uses_eta:
            options.update(eta=eta, final_alpha_cumprod=1.0 if self.cfg.sampling.final_alpha_one else abar[0])
        return spec.fn(model, x_T, abar, timesteps, generators=generators, callback=callback, **options)

    def regenerate(self, params: GenerationParams, progress: Callable[[int, int], None] | None = None) -> Image.Image:
        """The image `params` describes, pixel for pixel.

        An image's seed fixes its noise whatever the batch, but CPU convolutions pick kernels by
        batch size, which can move a pixel by one level. So the image's batch is rebuilt at its
        recorded size, with this image at its recorded position and its prompt in every slot (the
        other slots' content does not reach this image's arithmetic).
        """
        first = params.seed - params.batch_pos
        n, pos = (params.batch_size, params.batch_pos) if first >= 0 and 0 <= params.batch_pos < params.batch_size else (1, 0)
        images = self.generate(
            [params.prompt] * n, negative_prompt=params.negative_prompt, steps=params.steps, guidance=params.guidance,
            sampler=params.sampler, eta=params.eta, seed=params.seed - pos, height=params.height, width=params.width,
            batch_size=n, progress=progress,
        )
        return images[pos]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (B, 3, H, W)."""
        return self.vae.decode(z.float() / self.cfg.vae.scale_factor)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents, the space the U-Net works in."""
        posterior = self.vae.encode(images.float())
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.cfg.vae.scale_factor


def file_hash(path: str | Path) -> str:
    """First 10 hex digits of the file's SHA-256, like AUTOMATIC1111's model hash."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


def load_pipeline(path: str | Path, device=None, dtype=None, prediction_type: str | None = None, ema: str = "auto") -> Pipeline:
    """A model in any format the toolkit reads, with every loading problem reported as PipelineError (one line).

    A folder with pipeline.yaml is one of ours; a folder with model_index.json is a diffusers model; a
    .safetensors file is an SD single-file checkpoint (prediction_type and ema apply to those).
    """
    from .io.sd_formats import is_diffusers_folder, read_model

    path = Path(path)
    try:
        if path.is_dir() and not is_model_dir(path) and is_diffusers_folder(path) or path.is_file():
            pipe = Pipeline.from_states(*read_model(path, prediction_type, ema), name=str(path))
            # A1111 hashes the checkpoint file; a diffusers folder is hashed by its U-Net's file.
            pipe.model_hash = file_hash(path if path.is_file() else path / "unet" / "diffusion_pytorch_model.safetensors")
            return pipe.to(device, dtype)
        return Pipeline.load(path, device, dtype)
    except (WeightsError, ConfigError) as e:
        raise PipelineError(str(e)) from None
