"""Train a text-to-image latent diffusion model in one command: the VAE on the images, then the U-Net on its latents.

    python train.py --config configs/tiny.yaml [key=value ...]
    python train.py --config configs/tiny.yaml --stage vae|ldm|all     # default: all
    python train.py --config ... --resume       # continue from the latest valid checkpoint
    python train.py --config ... --overwrite    # start over in an output_dir that already holds a run
    accelerate launch train.py --config ...     # or: torchrun --nproc_per_node N train.py --config ...

Stage 1 (vae) trains the autoencoder: L1/L2 reconstruction + KL, and a PatchGAN term from
vae_training.disc_start on. It then sets the latent scale to 1/std(z) (LDM's scale_by_std) and
exports output_dir/vae/. It is skipped when vae_training.pretrained names a VAE.
Stage 2 (ldm) trains the U-Net (and the text encoder when text_encoder.trainable) by ε-prediction
on the frozen VAE's latents, and exports output_dir/model/: the folder sample.py and app.py load.

    output_dir/
      config.yaml                   the resolved config
      metrics.jsonl                 one JSON line per logged step: stage, step, loss, lr, images/s, ...
      vae/                          vae.yaml (with the latent scale) + vae.safetensors
      vae/checkpoints/step-XXXXXX/  vae, discriminator, state.pt, meta.json
      vae/samples/step-XXXXXX.png   held-back images above their reconstructions
      checkpoints/step-XXXXXX/      a loadable pipeline (EMA U-Net) + unet_train.safetensors, state.pt, meta.json
      samples/step-XXXXXX.png       the validation prompts, sampled with the EMA weights
      cache/                        latents and text embeddings, keyed on the data files and the encoders' weights
      model/                        the exported pipeline (EMA U-Net)
      tensorboard/                  with training.tensorboard

Exit status: 0 when done, or stopped by SIGINT/SIGTERM after saving a checkpoint; 1 for a problem at run
time (data, weights, a non-finite loss); 2 for a bad command line or config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from diffusion.cli import ArgumentParser
from diffusion.config import Config, ConfigError, load_config, load_yaml, save_config, to_dict
from diffusion.data import DataError, FolderIndex, ImageCaptionDataset, all_prompts, ensure_shapes, index_folder
from diffusion.data.evaluate import ATTRIBUTES
from diffusion.eval import TRAINING_PROMPTS, evaluate_shapes
from diffusion.pipeline import Pipeline, PipelineError, image_grid, to_pil
from diffusion.schedule import diffusion_loss
from diffusion.training import (
    EMA, Denoiser, LatentSource, MetricsLogger, PatchDiscriminator, ShardedOrder, StopRequest, TrainError,
    adamw, adaptive_weight, agree, batch_stream, check_in_sync, check_same, debug_record, epoch_loader, gather_rng, hinge_d_loss,
    latest_checkpoint, list_checkpoints, load_vae, lr_lambda, make_generator, psnr,
    restore_training_state, save_training_state, save_vae, vae_loss, write_checkpoint,
)
from diffusion.vae import AutoencoderKL
from diffusion.weights import WeightsError, load_state_dict_checked, save_weights

VAE_ADAM_BETAS = (0.5, 0.9)  # LDM's autoencoder setting (GAN training likes a short memory)
PREVIEW_STEPS = 20  # sampler steps for preview grids: cheap, and enough to see progress
EVAL_STEPS = 10  # DDIM steps for the in-training prompt fidelity: cheap, and it ranks runs as DDIM 50 does
SHAPES_PREVIEW = all_prompts()[::23]  # 4 prompts with distinct colors, shapes and positions


@dataclass
class Run:
    """What both stages share."""

    cfg: Config
    out: Path
    accelerator: Accelerator
    index: FolderIndex
    resume: bool
    logger: MetricsLogger
    stop: StopRequest

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, message: str) -> None:
        if self.main:
            tqdm.write(message, file=sys.stderr)


# ----------------------------------------------------------------------------- setup


def parse_args(argv=None):
    p = ArgumentParser(prog="train.py", description="Train the VAE, then the latent diffusion model.")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("--stage", choices=["vae", "ldm", "all"], default="all", help="default: all (VAE, then LDM)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the latest valid checkpoint in output_dir")
    mode.add_argument("--overwrite", action="store_true", help="delete the previous run's outputs in output_dir first")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. training.lr=2e-4")
    return p.parse_intermixed_args(argv)


def stages_to_run(stage: str, cfg: Config, out: Path, resume: bool) -> list[str]:
    vae_done = resume and (out / "vae" / "vae.yaml").is_file()
    vae = stage in ("vae", "all") and not cfg.vae_training.pretrained and not vae_done
    return (["vae"] if vae else []) + (["ldm"] if stage in ("ldm", "all") else [])


def stage_outputs(out: Path, stage: str) -> list[Path]:
    """What a stage writes; a folder holding any of it holds a run of that stage."""
    if stage == "vae":
        return [out / "vae"]
    return [out / "checkpoints", out / "model", out / "samples"]


def prepare_output_dir(out: Path, stages: list[str], args, accelerator: Accelerator) -> None:
    """Refuse to overwrite a previous run unless --resume or --overwrite; with --overwrite, clear it."""
    held = [p for s in stages for p in stage_outputs(out, s) if p.exists() and any(p.iterdir())]
    if held and not (args.resume or args.overwrite):
        raise TrainError(
            f"{out} already holds a training run ({held[0].name}/); pass --resume to continue it or --overwrite to start over"
        )
    accelerator.wait_for_everyone()  # every rank has looked before anything is deleted
    if args.overwrite and accelerator.is_main_process:
        for path in held:
            shutil.rmtree(path)
        for stage in stages:
            MetricsLogger(out / "metrics.jsonl", accelerator).truncate(stage, after_step=-1)
    accelerator.wait_for_everyone()


def save_run_config(cfg: Config, out: Path, run_say) -> None:
    """Write config.yaml; when resuming under a changed config, say which keys changed."""
    path = out / "config.yaml"
    if path.is_file():
        old, new = _flatten(load_yaml(path)), _flatten(to_dict(cfg))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            run_say(f"warning: the config differs from the one saved in {path}: {', '.join(changed[:5])}")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return flat


def load_data(cfg: Config, accelerator: Accelerator):
    """Index the data folder on every rank (deterministic, no collective), generating shapes data first if asked."""
    # One process per machine generates (the same bytes everywhere); the others wait, then find it there.
    with accelerator.local_main_process_first():
        if accelerator.is_local_main_process and ensure_shapes(cfg.data):
            print(f"generated {cfg.data.shapes.num} shapes images in {cfg.data.path}", file=sys.stderr)
    index = index_folder(cfg.data.path, cfg.data)
    if accelerator.is_main_process:
        print(index.report(), file=sys.stderr)
    return index


def make_accelerator(cfg: Config, out: Path) -> Accelerator:
    use_tb = cfg.training.tensorboard
    if use_tb:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            print("warning: training.tensorboard is set but tensorboard is not installed; metrics.jsonl only", file=sys.stderr)
            use_tb = False
    try:
        accelerator = Accelerator(
            mixed_precision=cfg.training.mixed_precision,
            cpu=not torch.cuda.is_available(),  # makes torchrun on CPUs use gloo data parallelism
            log_with="tensorboard" if use_tb else None,
            project_dir=str(out),
        )
    except (ValueError, RuntimeError) as e:
        raise TrainError(f"cannot set up Accelerate: {e}") from None
    if use_tb:
        accelerator.init_trackers("tensorboard")
    return accelerator


def distinct_captions(index, n: int) -> list[str]:
    seen: dict[str, None] = {}
    for _, captions in index.items:
        for c in captions:
            if c and len(seen) < n:
                seen.setdefault(c)
    return list(seen)


def preview_prompts(cfg: Config, index) -> list[str]:
    if cfg.training.validation_prompts:
        return list(cfg.training.validation_prompts)
    return list(SHAPES_PREVIEW) if cfg.data.shapes.generate else distinct_captions(index, 4)


def split_val(n: int, n_val: int, seed: int) -> tuple[list[int], list[int]]:
    """(held-back, training) indices: a seeded choice of n_val images kept out of VAE training."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n_val, n // 2)
    return sorted(perm[:n_val]), sorted(perm[n_val:])


# ----------------------------------------------------------------------------- stage 1: the VAE


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, images: torch.Tensor, seed: int, batch: int = 64) -> float:
    """1/std(z) over posterior samples of `images` (LDM's scale_by_std), so the U-Net sees unit-variance latents."""
    g = torch.Generator(device=images.device).manual_seed(seed)
    z = torch.cat([vae.encode(images[i : i + batch]).sample(g) for i in range(0, len(images), batch)])
    return 1.0 / float(z.float().std())


@torch.no_grad()
def vae_preview(run: Run, vae: AutoencoderKL, val: torch.Tensor, step: int) -> float:
    """PSNR of the held-back images' reconstructions (posterior mean); saves originals over reconstructions."""
    vae.eval()
    recon = torch.cat([vae.decode(vae.encode(val[i : i + 32]).mode()) for i in range(0, len(val), 32)])
    vae.train()
    shown = min(8, len(val))
    folder = run.out / "vae" / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    image_grid(to_pil(torch.cat([val[:shown], recon[:shown]])), cols=shown).save(folder / f"step-{step:06d}.png")
    return psnr(val, recon)


def train_vae(run: Run) -> bool:
    """Stage 1. Returns False when a signal stopped it (after saving a checkpoint)."""
    cfg, acc, vc = run.cfg, run.accelerator, run.cfg.vae_training
    root = run.out / "vae"
    set_seed(cfg.seed)
    vae = AutoencoderKL(cfg.vae).to(acc.device)
    disc = None
    if vc.disc_start >= 0:
        disc = PatchDiscriminator(n_layers=PatchDiscriminator.layers_for(cfg.data.resolution)).to(acc.device)
    opt = adamw(vae.parameters(), lr=vc.lr, betas=VAE_ADAM_BETAS, weight_decay=0.0)
    scheduler = LambdaLR(opt, lr_lambda(vc.warmup_steps, vc.max_steps, vc.lr_schedule))
    vae_ddp, opt = acc.prepare(vae, opt)
    optimizers = [opt]
    if disc is not None:  # the discriminator keeps a constant learning rate
        d_opt = adamw(disc.parameters(), lr=vc.lr, betas=VAE_ADAM_BETAS, weight_decay=0.0)
        disc_ddp, d_opt = acc.prepare(disc, d_opt)
        optimizers.append(d_opt)

    dataset = ImageCaptionDataset(run.index, cfg.data, train=True)
    val_idx, train_idx = split_val(len(dataset), vc.val_images, cfg.seed)
    plain = ImageCaptionDataset(run.index, cfg.data, train=False)
    val = torch.stack([plain[i]["pixels"] for i in val_idx]).to(acc.device)
    order = ShardedOrder(train_idx, vc.batch_size, cfg.seed, acc.process_index, acc.num_processes)
    gen = make_generator(acc, cfg.seed, stream=1)

    step, position = 0, (0, 0)
    found = latest_checkpoint(root / "checkpoints", run.say) if run.resume else None
    if found:
        path, weights, state = found
        load_state_dict_checked(vae, weights["vae"], what=str(path))
        if disc is not None:
            load_state_dict_checked(disc, weights["discriminator"], what=str(path))
        step, position = restore_training_state(state, acc, optimizers, scheduler, gen)
        run.logger.truncate("vae", step)
        run.say(f"resuming the VAE stage from {path}")
    check_same(acc, step, "processes resume from different steps; output_dir must be on a filesystem they all share")

    stream = batch_stream(order, position, epoch_loader(dataset, cfg.data.num_workers, cfg.seed))
    tick, ticked = time.perf_counter(), step
    bar = tqdm(total=vc.max_steps, initial=step, desc="vae", disable=not run.main, dynamic_ncols=True)
    with bar, run.stop.installed():
        while step < vc.max_steps:
            # batch: this rank's next images in the seeded order
            position, batch = next(stream)
            x = batch["pixels"].to(acc.device)
            # encode -> sample -> decode: x̂ from z ~ q(z|x)
            x_rec, posterior = vae_ddp(x, sample=True, generator=gen)
            # loss: reconstruction + KL, and the adversarial term once the discriminator is on
            rec, loss = vae_loss(x, x_rec, posterior, vc.rec_loss, vc.kl_weight)
            gan = disc is not None and step >= vc.disc_start
            if gan:
                disc.requires_grad_(False)  # the generator's term must not train the discriminator
                g_loss = -disc(x_rec).mean()
                disc.requires_grad_(True)
                loss = loss + vc.disc_weight * adaptive_weight(rec, g_loss, vae.decoder.conv_out.weight) * g_loss
            acc.backward(loss)
            # step: all ranks agree to stop on a non-finite loss (before anything is saved) or on a signal
            loss_value, stop = agree(acc, loss, run.stop.requested("vae", step + 1))
            check_finite(run, "vae", step + 1, loss_value, optimizers)
            if math.isfinite(loss_value):
                acc.clip_grad_norm_(vae.parameters(), vc.grad_clip)
                opt.step()
            scheduler.step()
            opt.zero_grad(set_to_none=True)
            if gan and math.isfinite(loss_value):  # the discriminator's step: real vs. reconstructed
                logits = disc_ddp(torch.cat([x, x_rec.detach()]))
                d_loss = hinge_d_loss(*logits.chunk(2))
                acc.backward(d_loss)
                d_opt.step()
                d_opt.zero_grad(set_to_none=True)
            step += 1
            debug_record(acc, stage="vae", step=step, indices=batch["index"].tolist())
            # log
            lr = scheduler.get_last_lr()[0]
            images_s = (step - ticked) * vc.batch_size * acc.num_processes / (time.perf_counter() - tick)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{images_s:.1f}")
            if step % cfg.training.log_every == 0 or step == vc.max_steps:
                run.logger.log("vae", step, loss=loss_value, rec=float(rec.detach()), lr=lr, images_per_s=images_s)
                tick, ticked = time.perf_counter(), step
            # checkpoint (+ reconstructions and PSNR)
            if step % vc.checkpoint_every == 0 or step == vc.max_steps or stop:
                rng = gather_rng(acc, gen)
                if run.main:
                    with write_checkpoint(root / "checkpoints", step, cfg.training.keep_checkpoints) as tmp:
                        save_weights(vae, tmp / "vae.safetensors")
                        if disc is not None:
                            save_weights(disc, tmp / "discriminator.safetensors")
                        save_training_state(tmp / "state.pt", step, position, acc, optimizers, scheduler, rng)
                    run.logger.log("vae", step, psnr=vae_preview(run, vae, val, step))
            if stop:
                return stopped(run, "vae", step)

    # finish: latent scale over a sample of the data, then export output_dir/vae/
    debug_record(acc, stage="vae", weights=check_in_sync(acc, vae, "VAE"))
    if run.main:
        vae.eval()
        scale_idx = train_idx[: vc.scale_samples]
        images = torch.stack([plain[i]["pixels"] for i in scale_idx]).to(acc.device)
        vae_cfg = dataclasses.replace(cfg.vae, scale_factor=latent_scale(vae, images, cfg.seed))
        save_vae(vae, vae_cfg, root)
        value = vae_preview(run, vae, val, step)
        run.logger.log("vae", step, psnr=value, scale_factor=vae_cfg.scale_factor)
        run.say(f"VAE done: PSNR {value:.2f} dB on {len(val)} held-back images, latent scale {vae_cfg.scale_factor:.5f}; saved {root}")
    acc.wait_for_everyone()  # the LDM stage reads output_dir/vae
    return True


def check_finite(run: Run, stage: str, step: int, loss: float, optimizers) -> None:
    """Stop on a non-finite loss before anything is saved, or (training.on_nonfinite: skip) drop the update."""
    if math.isfinite(loss):
        return
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if run.cfg.training.on_nonfinite == "skip":
        run.say(f"warning: non-finite loss ({loss}) at {stage} step {step}; update skipped (training.on_nonfinite: skip)")
        return
    last = list_checkpoints(run.out / ("vae/checkpoints" if stage == "vae" else "checkpoints"))
    where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was saved yet"
    raise TrainError(
        f"non-finite loss ({loss}) at {stage} step {step}; stopped without saving, {where} "
        "(--resume continues from it; lower the lr, or set training.on_nonfinite=skip)"
    )


def stopped(run: Run, stage: str, step: int) -> bool:
    run.say(f"stopped by {run.stop.signal} at {stage} step {step}; checkpoint saved, continue with --resume")
    return False


# ----------------------------------------------------------------------------- stage 2: latent diffusion


def build_pipeline(run: Run) -> Pipeline:
    """The pipeline to train: the frozen VAE from stage 1 (or vae_training.pretrained), fresh U-Net and text encoder."""
    cfg = run.cfg
    source = cfg.vae_training.pretrained or run.out / "vae"
    if not cfg.vae_training.pretrained and not (run.out / "vae" / "vae.yaml").is_file():
        raise TrainError(f"no VAE in {run.out / 'vae'}: run --stage vae (or all) first, or set vae_training.pretrained")
    vae_cfg, vae = load_vae(source, cfg.vae)
    try:
        cfg = dataclasses.replace(cfg, vae=vae_cfg)  # validates the VAE against the U-Net and the resolution
    except ConfigError as e:
        raise ConfigError(f"the VAE at {source} does not fit this config: {e}") from None
    set_seed(cfg.seed)  # the same initial weights whether or not stage 1 ran in this process
    n = len(run.index)
    info = dict(trained_on=f"{cfg.data.path} ({n} image-caption pairs)", example_prompts=tuple(distinct_captions(run.index, 4)))
    return Pipeline(cfg.pipeline_config(**info), vae=vae).to(run.accelerator.device)


def save_ldm_checkpoint(run, step, position, pipe, ema, optimizer, scheduler, gen) -> None:
    rng = gather_rng(run.accelerator, gen)  # a collective: every rank takes part
    if not run.main:
        return
    with write_checkpoint(run.out / "checkpoints", step, run.cfg.training.keep_checkpoints) as tmp:
        with ema.swapped_in(pipe.unet):
            pipe.save(tmp)  # pipeline.yaml + EMA U-Net: sample.py and app.py load a checkpoint as they load a model
        save_weights(pipe.unet, tmp / "unet_train.safetensors")
        save_training_state(tmp / "state.pt", step, position, run.accelerator, [optimizer], scheduler, rng)


@contextlib.contextmanager
def sampling_with_ema(pipe: Pipeline, ema: EMA):
    """The pipeline in eval mode with the EMA U-Net swapped in, and training's RNG left where it was."""
    with torch.random.fork_rng(devices=[]), ema.swapped_in(pipe.unet):
        pipe.unet.eval()
        pipe.text_encoder.eval()
        try:
            yield
        finally:
            pipe.unet.train()
            pipe.text_encoder.train()  # a frozen text encoder stays in eval mode


def save_preview(run: Run, pipe: Pipeline, ema: EMA, step: int) -> None:
    prompts = preview_prompts(run.cfg, run.index)
    with sampling_with_ema(pipe, ema):
        images = pipe.generate(prompts, steps=min(run.cfg.sampling.steps, PREVIEW_STEPS), seed=run.cfg.seed)
    (run.out / "samples").mkdir(exist_ok=True)
    image_grid(images, cols=min(4, len(images))).save(run.out / "samples" / f"step-{step:06d}.png")


def prompt_fidelity(run: Run, pipe: Pipeline, ema: EMA, step: int) -> dict[str, float]:
    """Score the EMA model on TRAINING_PROMPTS with DDIM; log it and return {"color": acc, ...}."""
    with sampling_with_ema(pipe, ema):
        result = evaluate_shapes(pipe, sampler="ddim", steps=EVAL_STEPS, prompts=TRAINING_PROMPTS)
    fields = {f"eval_{a}": result[a] for a in (*ATTRIBUTES, "all", "shape_fill")}
    if "held_out" in result:
        fields["eval_held_out_all"] = result["held_out"]["all"]
    run.logger.log("ldm", step, **fields)
    return {a: result[a] for a in (*ATTRIBUTES, "all")}


def param_groups(model: Denoiser, tc) -> list[dict]:
    """The U-Net's trainable parameters at training.lr and the text encoder's at training.text_encoder_lr."""
    groups = [{"params": [p for p in model.unet.parameters() if p.requires_grad], "lr": tc.lr}]
    if model.text_encoder is not None:
        lr = tc.lr if tc.text_encoder_lr is None else tc.text_encoder_lr
        groups.append({"params": [p for p in model.text_encoder.parameters() if p.requires_grad], "lr": lr})
    return groups


def train_ldm(run: Run) -> bool:
    """Stage 2. Returns False when a signal stopped it (after saving a checkpoint)."""
    cfg, acc, tc = run.cfg, run.accelerator, run.cfg.training
    pipe = build_pipeline(run)
    model = Denoiser(pipe.unet, pipe.text_encoder if cfg.text_encoder.trainable else None).train()
    groups = param_groups(model, tc)
    params = [p for g in groups for p in g["params"]]
    optimizer = adamw(groups, lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay, eps=tc.adam_eps)
    scheduler = LambdaLR(optimizer, lr_lambda(tc.warmup_steps, tc.max_steps, tc.lr_schedule))
    ema = EMA(pipe.unet, tc.ema_decay, tc.ema_warmup)
    model_ddp, optimizer = acc.prepare(model, optimizer)

    dataset = ImageCaptionDataset(run.index, cfg.data, train=True)
    source = LatentSource(pipe, dataset, cfg, run.out / "cache", acc)
    order = ShardedOrder(source.indices, tc.batch_size, cfg.seed, acc.process_index, acc.num_processes)
    gen = make_generator(acc, cfg.seed, stream=2)

    step, position = 0, (0, 0)
    found = latest_checkpoint(run.out / "checkpoints", run.say) if run.resume else None
    if found:
        path, weights, state = found
        load_state_dict_checked(pipe.unet, weights["unet_train"], what=str(path))
        ema.load_state_dict(weights["unet"])
        if cfg.text_encoder.trainable:
            load_state_dict_checked(pipe.text_encoder, weights["text_encoder"], what=str(path))
        step, position = restore_training_state(state, acc, [optimizer], scheduler, gen)
        run.logger.truncate("ldm", step)
        run.say(f"resuming the LDM stage from {path}")
    elif run.resume:
        run.say(f"no checkpoint in {run.out / 'checkpoints'}; the LDM stage starts from step 0")
    check_same(acc, step, "processes resume from different steps; output_dir must be on a filesystem they all share")

    stream = batch_stream(order, position, source.load)
    images_per_step = tc.batch_size * tc.grad_accum * acc.num_processes
    tick, ticked = time.perf_counter(), step
    fidelity: dict[str, str] = {}
    bar = tqdm(total=tc.max_steps, initial=step, desc="ldm", disable=not run.main, dynamic_ncols=True)
    with bar, run.stop.installed():
        while step < tc.max_steps:
            losses = []
            for micro in range(tc.grad_accum):
                # batch: this rank's next samples in the seeded order
                position, batch = next(stream)
                # encode: images -> scaled latents z0 (a lookup when cached), captions -> conditioning
                z0, cond = source.latents(batch, gen), source.conditioning(batch, gen)
                # noise + loss: ε-prediction at t ~ U{0..T-1} (diffusion_loss draws t and ε from gen)
                with acc.no_sync(model_ddp) if micro < tc.grad_accum - 1 else contextlib.nullcontext():
                    loss = diffusion_loss(
                        model_ddp, pipe.schedule, z0, cond,
                        min_snr_gamma=tc.min_snr_gamma, offset_noise=tc.offset_noise, generator=gen,
                    )
                    acc.backward(loss / tc.grad_accum)
                losses.append(loss.detach())
                debug_record(acc, stage="ldm", step=step + 1, indices=batch["index"].tolist())
            # step: all ranks agree to stop on a non-finite loss (before anything is saved) or on a signal
            loss_value, stop = agree(acc, torch.stack(losses).mean(), run.stop.requested("ldm", step + 1))
            check_finite(run, "ldm", step + 1, loss_value, [optimizer])
            if math.isfinite(loss_value):
                acc.clip_grad_norm_(params, tc.grad_clip)
                optimizer.step()
                # EMA of the U-Net's weights
                ema.update(pipe.unet, step)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # log
            lr = scheduler.get_last_lr()[0]
            images_s = (step - ticked) * images_per_step / (time.perf_counter() - tick)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{images_s:.1f}", **fidelity)
            if run.main and tc.eval_every and (step % tc.eval_every == 0 or step == tc.max_steps):
                started = time.perf_counter()
                fidelity = {a[:3]: f"{100 * v:.0f}%" for a, v in prompt_fidelity(run, pipe, ema, step).items()}
                tick += time.perf_counter() - started  # images/s counts training time only
            if step % tc.log_every == 0 or step == tc.max_steps:
                run.logger.log("ldm", step, loss=loss_value, lr=lr, images_per_s=images_s, ema_decay=ema.decay_at(step - 1))
                tick, ticked = time.perf_counter(), step
            # checkpoint (+ preview grid)
            if step % tc.checkpoint_every == 0 or step == tc.max_steps or stop:
                save_ldm_checkpoint(run, step, position, pipe, ema, optimizer, scheduler, gen)
                if run.main:
                    save_preview(run, pipe, ema, step)
            if stop:
                return stopped(run, "ldm", step)

    # finish: export the pipeline with the EMA U-Net
    weights_hash, ema_hash = check_in_sync(acc, pipe.unet, "U-Net"), check_in_sync(acc, ema.state_dict(), "EMA")
    debug_record(acc, stage="ldm", weights=weights_hash, ema=ema_hash)
    if run.main:
        with ema.swapped_in(pipe.unet):
            pipe.save(run.out / "model")
        run.say(f"saved the model to {run.out / 'model'} (load it with sample.py or app.py)")
    acc.wait_for_everyone()
    return True


# ----------------------------------------------------------------------------- main


def run_training(args) -> int:
    cfg = load_config(args.config, args.overrides)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, out)
    stages = stages_to_run(args.stage, cfg, out, args.resume)
    prepare_output_dir(out, stages, args, accelerator)
    if accelerator.is_main_process:
        save_run_config(cfg, out, lambda m: print(m, file=sys.stderr))
        if args.stage != "ldm" and "vae" not in stages:
            vae = cfg.vae_training.pretrained or f"{out / 'vae'} (finished)"
            print(f"skipping the VAE stage: using {vae}", file=sys.stderr)
    index = load_data(cfg, accelerator)
    logger = MetricsLogger(out / "metrics.jsonl", accelerator, trackers=bool(accelerator.trackers))
    run = Run(cfg, out, accelerator, index, args.resume, logger, StopRequest())
    for stage in stages:
        finished = train_vae(run) if stage == "vae" else train_ldm(run)
        if not finished:
            break
    accelerator.end_training()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # one line from a multi-process run, not one per rank
    try:
        return run_training(args)
    except ConfigError as e:
        code, message = 2, str(e)
    except (DataError, TrainError, WeightsError, PipelineError) as e:
        code, message = 1, str(e)
    except KeyboardInterrupt:
        code, message = 130, "interrupted; checkpoints already saved are intact"
    if rank0:
        print("error: " + " ".join(message.split("\n")), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
