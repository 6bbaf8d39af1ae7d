#!/usr/bin/env python
"""Our U-Net and pipeline against Hugging Face diffusers on exactly the same work, as time ratios.

    python benchmarks/bench_unet.py                  # CPU, full sizes (several minutes)
    python benchmarks/bench_unet.py --device cuda    # + channels_last and flash/mem-efficient SDPA on both sides
    python benchmarks/bench_unet.py --quick          # tiny sizes, for the test suite

Workloads, each run A B A B ... after warm-up and timed as the median of --repeats (default 5):
    (a) train     forward + backward + AdamW step, batch 16, latents 4x16x16, context 77x256, fp32;
                  each side's AdamW as its training script builds it (see OPTIMIZERS)
    (b) sample    one no-grad forward, batch 8, in fp32 and again under bf16 autocast
    (c) generate  4 images, 50 DDIM steps, classifier-free guidance, text encoding and VAE decode:
                  our Pipeline.generate() against the standard diffusers loop built from
                  UNet2DConditionModel, DDIMScheduler and AutoencoderKL of the same sizes, with
                  the same open_clip text tower on both sides.
The last line is `train_ratio=X sample_ratio=Y sample_bf16_ratio=Z generate_ratio=W`, each the
diffusers time divided by ours: above 1 means we are faster.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while they wait stall each other badly when other processes share the
# cores (we saw 10x slowdowns on a busy 2-core machine). Sleeping waits make timings stable; this
# must be set before torch loads OpenMP, and applies to both sides. Export it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

import diffusers  # noqa: E402
from diffusers import AutoencoderKL as HFAutoencoderKL  # noqa: E402
from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from diffusion.config import PipelineConfig, UNetConfig, VAEConfig, apply_overrides, from_dict, load_yaml  # noqa: E402
from diffusion.pipeline import Pipeline  # noqa: E402
from diffusion.train.optim import adamw  # noqa: E402
from diffusion.models.unet import UNet  # noqa: E402

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
SIDES = ("ours", "diffusers")


@dataclass
class Sizes:
    train_batch: int = 16
    sample_batch: int = 8
    images: int = 4
    steps: int = 50
    guidance: float = 7.5
    repeats: int = 5
    warmup: int = 2


QUICK_SIZES = Sizes(train_batch=2, sample_batch=2, images=1, steps=2, repeats=2, warmup=1)


# ----------------------------------------------------------------------------- the two sides


def load_bench_config(quick: bool) -> PipelineConfig:
    return from_dict(PipelineConfig, apply_overrides(load_yaml(CONFIG), QUICK_OVERRIDES if quick else []))


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
    """Give zero-initialised layers (ours has 29) small random weights, as training would: outputs
    then depend on every layer on both sides, and no branch is trivially zero."""
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
    """What StableDiffusionPipeline holds, with our open_clip text tower in place of transformers' CLIP."""

    unet: UNet2DConditionModel
    vae: HFAutoencoderKL
    scheduler: DDIMScheduler
    tokenizer: Callable  # open_clip's SimpleTokenizer: prompts -> (B, L) ids
    text_tower: torch.nn.Module  # open_clip TextTransformer: the very weights our TextEncoder runs
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
def diffusers_generate(side: DiffusersSide, prompts, sizes: Sizes, image_size: int, device, dtype, on_step=None):
    """StableDiffusionPipeline.__call__'s steps, for DDIM with classifier-free guidance."""
    # 1. Prompt and negative-prompt embeddings, batched uncond-first (encode_prompt).
    cond = diffusers_encode(side, prompts, device)
    uncond = diffusers_encode(side, [""] * len(prompts), device)
    embeds = torch.cat([uncond, cond]).to(dtype)
    # 2. Timesteps and the initial noise, one generator per image.
    side.scheduler.set_timesteps(sizes.steps, device=device)
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    side_len = image_size // side.image_processor.config.vae_scale_factor
    shape = (len(prompts), side.unet.config.in_channels, side_len, side_len)
    latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype) * side.scheduler.init_noise_sigma
    # 3. Denoising loop.
    for t in side.scheduler.timesteps:
        latent_in = side.scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = side.unet(latent_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
        noise_uncond, noise_cond = noise_pred.chunk(2)
        noise_pred = noise_uncond + sizes.guidance * (noise_cond - noise_uncond)
        latents = side.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step()
    # 4. VAE decode (fp32, as ours) and conversion to PIL images.
    image = side.vae.decode(latents.float() / side.vae.config.scaling_factor, return_dict=False)[0]
    return side.image_processor.postprocess(image, output_type="pil")


# ----------------------------------------------------------------------------- workloads


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


# ----------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable], repeats: int, warmup: int, device) -> dict[str, list[float]]:
    """Times of each side's fn, run alternately (A B A B ...) so that machine noise hits both alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return times


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, tries: int = 5) -> float:
    """This machine's best square-matmul rate in FLOP/s, measured now: the yardstick for `% of peak`."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up: thread pool and kernel selection
    return 2 * n**3 / min(timed(lambda: a @ b, device) for _ in range(tries))


def register_cpu_attention_flops() -> None:
    """flop_counter knows the CUDA attention kernels but not the CPU one SDPA picks: count it alike."""
    aten = torch.ops.aten
    fwd, bwd = aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(fwd)
    def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(bwd)
    def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn: Callable) -> int:
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class UNetTimer:
    """Hooks that time every U-Net call inside a generation, to find the loop's time outside it."""

    def __init__(self, unet: torch.nn.Module, device: torch.device):
        self.device = device
        self.reset()
        unet.register_forward_pre_hook(self._pre)
        unet.register_forward_hook(self._post)

    def reset(self) -> None:
        self.inside, self.first_start, self.last_step_end, self._start = 0.0, None, None, 0.0

    def _pre(self, module, args):
        sync(self.device)
        self._start = time.perf_counter()
        if self.first_start is None:
            self.first_start = self._start

    def _post(self, module, args, output):
        sync(self.device)
        self.inside += time.perf_counter() - self._start

    def step_done(self, *_) -> None:
        self.last_step_end = time.perf_counter()

    def outside(self) -> float:
        """Seconds of the sampling loop (first U-Net call to last step) spent outside the U-Net:
        scheduler arithmetic, guidance, noise."""
        return self.last_step_end - self.first_start - self.inside


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def rss_child_main(side: str, quick: bool) -> None:
    """Child process: build one U-Net and train it; print its peak RSS and the RSS before the build.

    Both libraries are imported in every child, so the baselines match. The import-time peak is
    cleared first (Linux's clear_refs), so VmHWM is the workload's own peak.
    """
    cfg, sizes = load_bench_config(quick), QUICK_SIZES if quick else Sizes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    baseline_kb = _status_kb("VmRSS")
    torch.manual_seed(0)
    unet = no_zero_weights(UNet(cfg.unet)) if side == "ours" else build_diffusers_unet(cfg)
    step = make_train_step(side, unet, call_for(side, unet), sizes.train_batch, cfg, torch.device("cpu"))
    for _ in range(3):
        step()
    print(json.dumps({"peak_kb": _status_kb("VmHWM"), "baseline_kb": baseline_kb}))


def start_peak_rss(quick: bool, threads: int) -> dict[str, subprocess.Popen]:
    """Start one fresh process per side to measure workload (a)'s peak RSS (see rss_child_main)."""
    cmd = [sys.executable, __file__, "--threads", str(threads)] + (["--quick"] if quick else [])
    return {k: subprocess.Popen(cmd + ["--rss-child", k], stdout=subprocess.PIPE, text=True) for k in SIDES}


def collect_peak_rss(children: dict[str, subprocess.Popen]) -> dict[str, dict]:
    results = {}
    for k, child in children.items():
        out, _ = child.communicate()
        if child.returncode:
            raise RuntimeError(f"the peak-RSS child for {k} failed with exit code {child.returncode}")
        results[k] = json.loads(out.strip().splitlines()[-1])
    return results


# ----------------------------------------------------------------------------- report


def machine_line(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"device=cuda ({torch.cuda.get_device_name()}) torch={torch.__version__} diffusers={diffusers.__version__}"
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0]
    return (f"device=cpu ({cpu}, {os.cpu_count()} logical cores, load average {load:.1f}) threads={threads} "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} torch={torch.__version__} diffusers={diffusers.__version__}")


def print_sizes(params, vae_params, flops, sizes: Sizes) -> None:
    print(f"\n{'':10s} {'U-Net params':>14s} {'VAE params':>12s} {'fwd GFLOP':>10s} {'train GFLOP':>12s} {'generate GFLOP':>15s}")
    for k in SIDES:
        print(f"{k:10s} {params[k]:>14,d} {vae_params[k]:>12,d} {flops[k]['sample'] / 1e9:>10.2f} "
              f"{flops[k]['train'] / 1e9:>12.2f} {flops[k]['generate'] / 1e9:>15.1f}")
    print(f"(fwd: batch {sizes.sample_batch}; train: forward + backward, batch {sizes.train_batch}; "
          f"generate: {sizes.images} images x {sizes.steps} steps with CFG, text encoder and VAE decode)")
    print(f"ours/diffusers: params {params['ours'] / params['diffusers']:.4f}, "
          f"fwd FLOPs {flops['ours']['sample'] / flops['diffusers']['sample']:.4f}, "
          f"train FLOPs {flops['ours']['train'] / flops['diffusers']['train']:.4f}")


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads, the same for both sides (default: torch's, the physical cores)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per workload (default 5; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats, for the test suite")
    p.add_argument("--compile", action="store_true", help="torch.compile both U-Nets")
    p.add_argument("--gen-dtype", choices=["fp32", "bf16"], default=None,
                   help="U-Net and text encoder dtype in (c) (default fp32 on CPU, bf16 on CUDA); VAEs stay fp32")
    p.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS measurement in child processes")
    p.add_argument("--rss-child", choices=SIDES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        return rss_child_main(args.rss_child, args.quick)
    diffusers.utils.logging.set_verbosity_error()  # quiet the fp32-modules note that .float() prints
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sizes = dataclasses.replace(QUICK_SIZES if args.quick else Sizes())
    sizes.repeats = args.repeats or sizes.repeats
    # On a GPU both sides get channels_last inputs and weights, and SDPA may use only its fused kernels.
    fmt = torch.channels_last if cuda else torch.contiguous_format
    gen_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.gen_dtype or ("bf16" if cuda else "fp32")]
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        contextlib.ExitStack().enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]))
    print(machine_line(device, args.threads))
    register_cpu_attention_flops()
    # The peak-RSS children run side by side (each process's peak is its own). With --quick they
    # start now and overlap the timings, which --quick does not care about; else after them.
    measure_rss = not cuda and not args.skip_rss
    rss_children = start_peak_rss(args.quick, args.threads) if measure_rss and args.quick else None

    # Both sides from one config. (a) and (b) get their own copies, so that sampling sees untrained weights.
    cfg = load_bench_config(args.quick)
    ours = build_ours(cfg).to(device, gen_dtype)
    theirs = build_diffusers(cfg, ours)
    theirs.unet.to(device, gen_dtype)
    theirs.vae.to(device)
    sample_unets = {"ours": copy.deepcopy(ours.unet).float(), "diffusers": copy.deepcopy(theirs.unet).float()}
    train_unets = {k: copy.deepcopy(u) for k, u in sample_unets.items()}
    if cuda:
        for unet in [*sample_unets.values(), *train_unets.values(), ours.unet, theirs.unet]:
            unet.to(memory_format=fmt)
    params = {k: sum(p.numel() for p in u.parameters()) for k, u in sample_unets.items()}
    vae_params = {"ours": sum(p.numel() for p in ours.vae.parameters()),
                  "diffusers": sum(p.numel() for p in theirs.vae.parameters())}

    def workloads():
        train = {k: make_train_step(k, u, call_for(k, u), sizes.train_batch, cfg, device, fmt) for k, u in train_unets.items()}
        fp32 = {k: make_sample_step(call_for(k, u), sizes.sample_batch, cfg, device, None, fmt) for k, u in sample_unets.items()}
        bf16 = {k: make_sample_step(call_for(k, u), sizes.sample_batch, cfg, device, torch.bfloat16, fmt)
                for k, u in sample_unets.items()}
        return train, fp32, bf16

    # (c) generation. Each U-Net call is timed by hooks (UNetTimer) to find the time spent outside it.
    prompts = (PROMPTS * sizes.images)[: sizes.images]
    timers: dict[str, UNetTimer] = {}
    outside = {k: [] for k in SIDES}

    def generate(side: str) -> Callable:
        def run():
            timer = timers.get(side)  # none yet while FLOPs are counted
            if timer is not None:
                timer.reset()
            start = time.perf_counter()
            if side == "ours":
                ours.generate(prompts, steps=sizes.steps, guidance=sizes.guidance, seed=0, height=cfg.info.resolution,
                              width=cfg.info.resolution, batch_size=len(prompts),
                              progress=timer.step_done if timer is not None else None)
            else:
                diffusers_generate(theirs, prompts, sizes, cfg.info.resolution, device, gen_dtype,
                                   timer.step_done if timer is not None else None)
            sync(device)
            if timer is not None:
                outside[side].append(timer.outside() / (time.perf_counter() - start))

        return run

    # FLOPs are counted before any torch.compile, by torch.utils.flop_counter, on both sides alike.
    # Counting runs each workload once, so it doubles as the first warm-up run.
    train_steps, sample_steps, bf16_steps = workloads()
    generate_runs = {k: generate(k) for k in SIDES}
    flops = {k: {"train": count_flops(train_steps[k]), "sample": count_flops(sample_steps[k]),
                 "generate": count_flops(generate_runs[k])} for k in SIDES}
    if args.compile:
        for k in SIDES:
            sample_unets[k], train_unets[k] = torch.compile(sample_unets[k]), torch.compile(train_unets[k])
        train_steps, sample_steps, bf16_steps = workloads()
        ours.unet, theirs.unet = torch.compile(ours.unet), torch.compile(theirs.unet)
    timers.update(ours=UNetTimer(ours.unet, device), diffusers=UNetTimer(theirs.unet, device))
    # A generation takes long; the counting run was its warm-up, unless compiling has to happen.
    generate_warmup = 1 if args.compile else 0

    peak = {"fp32": matmul_peak(device, torch.float32, 512 if args.quick else 2048),
            "bf16": matmul_peak(device, torch.bfloat16, 256 if args.quick else 2048 if cuda else 512)}
    print(f"matmul peak (measured now): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s")
    if peak["bf16"] < peak["fp32"]:  # no bf16 hardware: autocast's bf16 kernels widen to fp32 and back
        print("  (bf16 matmuls are slower than fp32 here, so bf16 rates below are given against the fp32 peak)")
        peak["bf16"] = peak["fp32"]
    print_sizes(params, vae_params, flops, sizes)

    # key: (label, the two sides' runs, FLOP key, precision, extra warm-up runs)
    table = {
        "train": (f"train fp32 (b={sizes.train_batch})", train_steps, "train", "fp32", sizes.warmup),
        "sample": (f"sample fp32 (b={sizes.sample_batch})", sample_steps, "sample", "fp32", sizes.warmup),
        "sample_bf16": (f"sample bf16 (b={sizes.sample_batch})", bf16_steps, "sample", "bf16", sizes.warmup),
        "generate": (f"generate ({sizes.images} img)", generate_runs, "generate",
                     "bf16" if gen_dtype == torch.bfloat16 else "fp32", generate_warmup),
    }
    print("(a)'s AdamW: ours fused (as train.py builds it), diffusers torch's default (as train_text_to_image.py)")
    print(f"\n{'workload':24s} {'ours ms':>10s} {'diffusers ms':>13s} {'ratio':>7s}   GFLOP/s (% of matmul peak)")
    ratios = {}
    for key, (label, fns, flop_key, precision, warmup) in table.items():
        times = interleaved(fns, sizes.repeats, warmup, device)
        median = {k: statistics.median(v) for k, v in times.items()}
        ratios[key] = median["diffusers"] / median["ours"]
        rate = {k: flops[k][flop_key] / median[k] / 1e9 for k in SIDES}
        pct = {k: 100 * rate[k] * 1e9 / peak[precision] for k in SIDES}
        print(f"{label:24s} {median['ours'] * 1e3:10.1f} {median['diffusers'] * 1e3:13.1f} {ratios[key]:7.3f}   "
              f"ours {rate['ours']:6.1f} ({pct['ours']:4.1f}%)  diffusers {rate['diffusers']:6.1f} ({pct['diffusers']:4.1f}%)")

    share = {k: 100 * statistics.median(v) for k, v in outside.items()}
    print(f"\ngeneration time outside the U-Net (scheduler, CFG, noise; median): "
          f"ours {share['ours']:.2f}%, diffusers {share['diffusers']:.2f}%")
    if cuda:
        print("peak RSS: not measured on CUDA (the GPU memory is what matters there)")
    elif measure_rss:
        rss = collect_peak_rss(rss_children or start_peak_rss(args.quick, args.threads))
        mib = {k: v["peak_kb"] / 1024 for k, v in rss.items()}
        grown = {k: (v["peak_kb"] - v["baseline_kb"]) / 1024 for k, v in rss.items()}
        print(f"peak RSS of (a), fresh process each: ours {mib['ours']:.0f} MiB, diffusers {mib['diffusers']:.0f} MiB "
              f"(ours/diffusers {mib['ours'] / mib['diffusers']:.3f}); above the imports: ours {grown['ours']:.0f} MiB, "
              f"diffusers {grown['diffusers']:.0f} MiB ({grown['ours'] / grown['diffusers']:.3f})")

    print(f"train_ratio={ratios['train']:.3f} sample_ratio={ratios['sample']:.3f} "
          f"sample_bf16_ratio={ratios['sample_bf16']:.3f} generate_ratio={ratios['generate']:.3f}")


if __name__ == "__main__":
    main()
