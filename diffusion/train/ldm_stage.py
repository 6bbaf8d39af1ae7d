"""Stage 2: the U-Net (and the text encoder when text_encoder.trainable) by ε- or v-prediction on the
frozen VAE's latents, with an EMA of the U-Net that the checkpoints, previews and the export use.

Checkpoints are loadable pipelines (pipeline.yaml + the EMA U-Net), so sample.py and app.py load one
as they load a model, plus unet_train.safetensors (the raw weights) and state.pt.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator, Optional

import torch
from accelerate.utils import set_seed
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.lr_scheduler import LambdaLR

from ..config import ConfigError
from ..data import ImageCaptionDataset, all_prompts
from ..data.buckets import config_buckets, histogram
from ..data.shards import ShardIndex, ShardOrder, shard_loader
from ..errors import TrainError
from ..eval.fidelity import TRAINING_PROMPTS, evaluate_shapes
from ..eval.shapes import ATTRIBUTES
from ..io.vae_folder import load_vae
from ..io.weights import load_state_dict_checked, save_weights
from ..pipeline import Pipeline, PipelineError, image_grid, load_pipeline
from ..schedule import diffusion_loss
from .cache import LatentSource
from .distributed import make_generator
from .loop import Run, Stage
from .optim import EMA, adamw, lr_lambda
from .order import BucketOrder, ShardedOrder

PREVIEW_STEPS = 20  # sampler steps for preview grids: cheap, and enough to see progress
EVAL_STEPS = 10  # DDIM steps for the in-training prompt fidelity: cheap, and it ranks runs as DDIM 50 does
SHAPES_PREVIEW = all_prompts()[::23]  # 4 prompts with distinct colors, shapes and positions


class Denoiser(nn.Module):
    """The trained part of the LDM as one module, net(x_t, t, cond) -> ε, so that DDP wraps and syncs it whole.

    cond is the text encoder's hidden states (B, L, D) when the encoder is frozen (they come from a
    cache), or token ids (B, L) when it trains: it then runs inside this forward, where DDP sees it.
    """

    def __init__(self, unet: nn.Module, text_encoder: Optional[nn.Module] = None):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        if text_encoder is not None:
            freeze_unused(text_encoder)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.text_encoder is not None:
            cond = self.text_encoder(cond)[0]  # token ids -> hidden states (B, L, D)
        return self.unet(x_t, t, cond)


def freeze_unused(text_encoder: nn.Module) -> None:
    """Freeze the parameters that the hidden states never depend on (CLIP's pooled projection, and the
    last block under layer=penultimate): they get no gradient, which DDP reports as an error."""
    params = [p for p in text_encoder.parameters() if p.requires_grad]
    device = next(text_encoder.parameters()).device
    hidden = text_encoder(text_encoder.tokenize([""]).to(device))[0]
    grads = torch.autograd.grad(hidden.sum(), params, allow_unused=True)
    for p, g in zip(params, grads):
        if g is None:
            p.requires_grad_(False)


def distinct_captions(index, n: int) -> list[str]:
    seen: dict[str, None] = {}
    captions = index.captions(4 * n) if isinstance(index, ShardIndex) else (c for _, caps in index.items for c in caps)
    for c in captions:
        if c and len(seen) < n:
            seen.setdefault(c)
    return list(seen)


def build_pipeline(run: Run) -> Pipeline:
    """The pipeline to train: a pretrained model (model.pretrained), or the frozen VAE from stage 1 (or
    vae_training.pretrained) with a fresh U-Net and text encoder."""
    cfg = run.cfg
    n = len(run.index)
    info = dict(trained_on=f"{cfg.data.path} ({n} image-caption pairs)", example_prompts=tuple(distinct_captions(run.index, 4)))
    if cfg.model.pretrained:
        return pretrained_pipeline(cfg, info).to(run.accelerator.device)
    source = cfg.vae_training.pretrained or run.out / "vae"
    if not cfg.vae_training.pretrained and not (run.out / "vae" / "vae.yaml").is_file():
        raise TrainError(f"no VAE in {run.out / 'vae'}: run --stage vae (or all) first, or set vae_training.pretrained")
    vae_cfg, vae = load_vae(source, cfg.vae)
    try:
        cfg = dataclasses.replace(cfg, vae=vae_cfg)  # validates the VAE against the U-Net and the resolution
    except ConfigError as e:
        raise ConfigError(f"the VAE at {source} does not fit this config: {e}") from None
    set_seed(cfg.seed)  # the same initial weights whether or not stage 1 ran in this process
    return Pipeline(cfg.pipeline_config(**info), vae=vae).to(run.accelerator.device)


def pretrained_pipeline(cfg, info: dict) -> Pipeline:
    """model.pretrained with its own architecture, training schedule and sampling defaults; only whether the
    text encoder trains, gradient checkpointing and dropout come from this config."""
    m = cfg.model
    try:
        base = load_pipeline(m.pretrained, device="cpu", prediction_type=m.prediction_type, ema=m.ema)
    except PipelineError as e:
        raise TrainError(f"model.pretrained: {e}") from None
    b = base.cfg
    text = dataclasses.replace(b.text_encoder, trainable=cfg.text_encoder.trainable)
    unet = dataclasses.replace(b.unet, gradient_checkpointing=cfg.unet.gradient_checkpointing, dropout=cfg.unet.dropout)
    model_info = dataclasses.replace(b.info, name=cfg.name, resolution=cfg.data.resolution, **info)
    pcfg = dataclasses.replace(b, text_encoder=text, unet=unet, info=model_info)
    if cfg.data.resolution % b.vae.factor:
        raise ConfigError(f"data.resolution ({cfg.data.resolution}) must be divisible by the pretrained VAE's factor {b.vae.factor}")
    pipe = Pipeline.from_states(pcfg, {c: getattr(base, c).state_dict() for c in ("vae", "text_encoder", "unet")}, name=m.pretrained)
    pipe.vae.requires_grad_(False)
    pipe.model_hash = base.model_hash  # what an adapter trained on it records as its base
    return pipe


def param_groups(model: Denoiser, tc) -> list[dict]:
    """The U-Net's trainable parameters at training.lr and the text encoder's at training.text_encoder_lr."""
    groups = [{"params": [p for p in model.unet.parameters() if p.requires_grad], "lr": tc.lr}]
    if model.text_encoder is not None:
        lr = tc.lr if tc.text_encoder_lr is None else tc.text_encoder_lr
        groups.append({"params": [p for p in model.text_encoder.parameters() if p.requires_grad], "lr": lr})
    return groups


@contextlib.contextmanager
def sampling_with_ema(pipe: Pipeline, ema: EMA, averaged: nn.Module):
    """The pipeline in eval mode with the EMA weights swapped in, and training's RNG left where it was.

    Adapters' weights (W + B·A, see lora.network) are formed once for the whole sampling run, not per step.
    """
    with torch.random.fork_rng(devices=[]), ema.swapped_in(averaged), parametrize.cached():
        pipe.unet.eval()
        pipe.text_encoder.eval()
        try:
            yield
        finally:
            pipe.unet.train()
            pipe.text_encoder.train()  # a frozen text encoder stays in eval mode


class LDMStage(Stage):
    name, title = "ldm", "LDM"

    def __init__(self, run: Run):
        cfg, acc, tc = run.cfg, run.accelerator, run.cfg.training
        self.run, self.tc = run, tc
        self.checkpoints, self.max_steps, self.checkpoint_every = run.out / "checkpoints", tc.max_steps, tc.checkpoint_every
        self.images_per_step, self.grad_clip = tc.batch_size * tc.grad_accum * acc.num_processes, tc.grad_clip
        self.pipe = pipe = self.build(run)
        run.layout(pipe.unet)
        self.model = Denoiser(pipe.unet, pipe.text_encoder if self.text_trains else None).train()
        groups = self.param_groups()
        self.params = [p for g in groups for p in g["params"]]
        optimizer = adamw(groups, lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay, eps=tc.adam_eps)
        self.scheduler = LambdaLR(optimizer, lr_lambda(tc.warmup_steps, tc.max_steps, tc.lr_schedule))
        self.ema = EMA(self.averaged, tc.ema_decay, tc.ema_warmup)
        self.model_ddp, self.optimizer = acc.prepare(self.model, optimizer)

        self.generator = make_generator(acc, cfg.seed, stream=2)
        self.skipped = 0  # corrupt shard members passed over since the last metrics line (this rank)
        if isinstance(run.index, ShardIndex):  # streamed: the workers read the cached rows, or decode
            self.order = ShardOrder(run.index, tc.batch_size, cfg.seed, acc.process_index, acc.num_processes, cfg.data.num_workers)
            self.source = LatentSource(pipe, None, cfg, run.out / "cache", acc, self.text_trains, shards=run.index)
            self.load = shard_loader(self.order, cfg.data, tc.batch_size, cfg.seed, read=self.source.shard_rows)
            return
        buckets = config_buckets(cfg.data, pipe.vae_factor) if cfg.data.buckets else None
        dataset = ImageCaptionDataset(run.index, cfg.data, train=True, buckets=buckets)
        if buckets:
            run.say(histogram(dataset.bucket_of, dataset.buckets))
        self.source = LatentSource(pipe, dataset, cfg, run.out / "cache", acc, self.text_trains)
        if buckets:
            self.order = BucketOrder(self.source.indices, dataset.bucket_of, tc.batch_size, cfg.seed, acc.process_index, acc.num_processes)
        else:
            self.order = ShardedOrder(self.source.indices, tc.batch_size, cfg.seed, acc.process_index, acc.num_processes)
        self.load = self.source.load

    # What a subclass (LoRAStage) changes: the pipeline it trains, which weights train and are averaged.

    def build(self, run: Run) -> Pipeline:
        return build_pipeline(run)

    @property
    def text_trains(self) -> bool:
        return self.run.cfg.text_encoder.trainable

    @property
    def averaged(self) -> nn.Module:
        """The module whose EMA previews, checkpoints and the export use."""
        return self.pipe.unet

    def param_groups(self) -> list[dict]:
        return param_groups(self.model, self.tc)

    def forward_backward(self, stream: Iterator, step: int) -> tuple[torch.Tensor, tuple[int, int], list[int]]:
        """grad_accum micro-batches: latents and conditioning, then the diffusion loss (t and ε drawn from the generator)."""
        tc, acc = self.tc, self.run.accelerator
        losses, indices = [], []
        for micro in range(tc.grad_accum):
            position, batch = next(stream)
            z0, cond = self.source.latents(batch, self.generator), self.source.conditioning(batch, self.generator)
            with acc.no_sync(self.model_ddp) if micro < tc.grad_accum - 1 else contextlib.nullcontext():
                loss = diffusion_loss(
                    self.model_ddp, self.pipe.schedule, z0, cond,
                    min_snr_gamma=tc.min_snr_gamma, offset_noise=tc.offset_noise, generator=self.generator,
                )
                acc.backward(loss / tc.grad_accum)
            losses.append(loss.detach())
            indices += batch["index"].tolist()
            self.skipped += batch.get("skipped", 0)
        return torch.stack(losses).mean(), position, indices

    def after_update(self, step: int) -> None:
        self.ema.update(self.averaged, step)

    def log_values(self, step: int) -> dict[str, float]:
        values = {"ema_decay": self.ema.decay_at(step - 1)}
        if isinstance(self.run.index, ShardIndex):  # every rank logs a line at the same steps: a safe collective
            values["data_skipped"] = skipped_members(self.run.accelerator, self)
        return values

    def evaluate(self, step: int) -> Optional[dict[str, str]]:
        """Every training.eval_every steps: prompt fidelity of the EMA model on eval_prompts, with DDIM."""
        every = self.tc.eval_every
        if not every or (step % every and step != self.max_steps):
            return None
        try:
            with sampling_with_ema(self.pipe, self.ema, self.averaged):
                result = evaluate_shapes(self.pipe, sampler="ddim", steps=EVAL_STEPS, prompts=eval_prompts(self.run.cfg))
        except PipelineError as e:  # weights gone non-finite: the loss check stops the run, not the scoring
            self.run.say(f"warning: prompt fidelity at step {step} skipped: {e}")
            return None
        fields = {f"eval_{a}": result[a] for a in (*ATTRIBUTES, "all", "shape_fill")}
        if "held_out" in result:
            fields["eval_held_out_all"] = result["held_out"]["all"]
        self.run.logger.log(self.name, step, **fields)
        return {a[:3]: f"{100 * result[a]:.0f}%" for a in (*ATTRIBUTES, "all")}

    def restore(self, weights: dict, path: Path) -> None:
        load_state_dict_checked(self.pipe.unet, weights["unet_train"], what=str(path))
        self.ema.load_state_dict(weights["unet"])
        if self.run.cfg.text_encoder.trainable:
            load_state_dict_checked(self.pipe.text_encoder, weights["text_encoder"], what=str(path))

    def save(self, folder: Path) -> None:
        with self.ema.swapped_in(self.pipe.unet):
            self.pipe.save(folder)  # pipeline.yaml + EMA U-Net: loadable as a model
        save_weights(self.pipe.unet, folder / "unet_train.safetensors")

    def preview(self, step: int) -> None:
        """The validation prompts, sampled with the EMA weights, as samples/step-XXXXXX.png."""
        cfg = self.run.cfg
        prompts = preview_prompts(cfg, self.run.index)
        try:
            with sampling_with_ema(self.pipe, self.ema, self.averaged):
                images = self.pipe.generate(prompts, steps=min(cfg.sampling.steps, PREVIEW_STEPS), seed=cfg.seed)
        except PipelineError as e:  # weights gone non-finite: the loss check stops the run, not the preview
            self.run.say(f"warning: preview at step {step} skipped: {e}")
            return
        (self.run.out / "samples").mkdir(exist_ok=True)
        image_grid(images, cols=min(4, len(images))).save(self.run.out / "samples" / f"step-{step:06d}.png")

    def synced(self) -> dict:
        return {"weights": (self.pipe.unet, "U-Net"), "ema": (self.ema.state_dict(), "EMA")}

    def export(self, step: int) -> None:
        with self.ema.swapped_in(self.pipe.unet):
            self.pipe.save(self.run.out / "model")
        self.run.say(f"saved the model to {self.run.out / 'model'} (load it with sample.py or app.py)")


def skipped_members(accelerator, stage) -> int:
    """Corrupt shard members that all ranks passed over since the last call (a collective)."""
    count = torch.tensor(float(stage.skipped), device=accelerator.device)
    stage.skipped = 0
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, "sum")
    return int(count)


def eval_prompts(cfg) -> list[str]:
    """A fixed third of the shapes prompts; all the prompts of data.shapes.colors when the data has other colors."""
    colors = cfg.data.shapes.colors
    return list(all_prompts(colors)) if colors else list(TRAINING_PROMPTS)


def preview_prompts(cfg, index) -> list[str]:
    if cfg.training.validation_prompts:
        return list(cfg.training.validation_prompts)
    if not cfg.data.shapes.generate:
        return distinct_captions(index, 4)
    colors = cfg.data.shapes.colors
    return list(all_prompts(colors)[::4][:4]) if colors else list(SHAPES_PREVIEW)
