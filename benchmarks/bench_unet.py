#!/usr/bin/env python
"""Our U-Net and pipeline against Hugging Face diffusers on exactly the same work, as time ratios.

    python benchmarks/bench_unet.py                  # CPU, full sizes (several minutes)
    python benchmarks/bench_unet.py --device cuda    # + channels_last and flash/mem-efficient SDPA on both sides
    python benchmarks/bench_unet.py --quick          # tiny sizes, for the test suite

Workloads, each run A B A B ... after warm-up and timed as the median of --repeats rounds (default
5, and more, up to 25, until the rounds add up to 30 s: short workloads get 10-25):
    (a) train     forward + backward + AdamW step, batch 16, latents 4x16x16, context 77x256, fp32;
                  each side's AdamW as its training script builds it (see workloads.OPTIMIZERS)
    (b) sample    one no-grad forward, batch 8, in fp32 and again under bf16 autocast
    (c) generate  4 images, 50 DDIM steps, classifier-free guidance, text encoding and VAE decode:
                  our Pipeline.generate() against the standard diffusers loop built from
                  UNet2DConditionModel, DDIMScheduler and AutoencoderKL of the same sizes, with
                  the same CLIP text tower on both sides. The same images; ours does 5% fewer
                  FLOPs, as it projects the text's keys and values once per batch (UNet.prepare_context).
The last line is `train_ratio=X sample_ratio=Y sample_bf16_ratio=Z generate_ratio=W`, each the
diffusers time divided by ours: above 1 means we are faster.

Beside this script: sides.py builds the two sides from one config, workloads.py holds the config,
the sizes and the steps of (a) and (b), and measure.py the timing, FLOP and peak-RSS tools.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while they wait stall each other badly when other processes share the
# cores. Sleeping waits make timings stable; this must be set before torch loads OpenMP (so before
# the imports below, benchmarks.* included), and applies to both sides. Export it to override. Only
# a benchmark run sets it: a process that imports this module keeps its own environment.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
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

import diffusers  # noqa: E402

from benchmarks.measure import (  # noqa: E402
    UNetTimer, collect_peak_rss, count_flops, interleaved, matmul_peaks, peak_rss_of, register_cpu_op_flops, sync,
)
from benchmarks.sides import (  # noqa: E402
    SIDES, DiffusersSide, build_diffusers, build_diffusers_unet, build_ours, diffusers_generate, no_zero_weights,
)
from benchmarks.workloads import (  # noqa: E402
    PROMPTS, QUICK_SIZES, Sizes, call_for, load_bench_config, make_sample_step, make_train_step,
)
from diffusion.config import PipelineConfig  # noqa: E402
from diffusion.models.unet import UNet  # noqa: E402
from diffusion.pipeline import Pipeline  # noqa: E402


# ----------------------------------------------------------------------------- set-up


@dataclass
class Settings:
    """What the command line and the device fix for the whole run."""

    args: argparse.Namespace
    device: torch.device
    sizes: Sizes
    memory_format: torch.memory_format  # of both sides' U-Net weights and inputs
    gen_dtype: torch.dtype  # of the U-Nets and the text encoder in (c)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def measure_rss(self) -> bool:
        return not self.cuda and not self.args.skip_rss


def set_up(args: argparse.Namespace) -> Settings:
    """Sizes, layout, dtypes and attention kernels for both sides; prints the machine line."""
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

        # Entered for the rest of the process: a context that is garbage-collected would restore the default kernels.
        sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]).__enter__()
    print(machine_line(device, args.threads))
    register_cpu_op_flops()
    return Settings(args, device, sizes, fmt, gen_dtype)


# ----------------------------------------------------------------------------- the two sides, built from one config


@dataclass
class Models:
    """Both sides, built from one config. (a) and (b) get their own U-Net copies, so that sampling
    sees untrained weights; (c) runs the pipelines' own U-Nets, in the generation dtype."""

    cfg: PipelineConfig
    ours: Pipeline
    theirs: DiffusersSide
    sample_unets: dict[str, torch.nn.Module]
    train_unets: dict[str, torch.nn.Module]


def build_both_sides(s: Settings) -> Models:
    cfg = load_bench_config(s.args.quick)
    ours = build_ours(cfg).to(s.device, s.gen_dtype)
    theirs = build_diffusers(cfg, ours)
    theirs.unet.to(s.device, s.gen_dtype)
    theirs.vae.to(s.device)
    sample_unets = {"ours": copy.deepcopy(ours.unet).float(), "diffusers": copy.deepcopy(theirs.unet).float()}
    train_unets = {k: copy.deepcopy(u) for k, u in sample_unets.items()}
    if s.cuda:
        for unet in [*sample_unets.values(), *train_unets.values(), ours.unet, theirs.unet]:
            unet.to(memory_format=s.memory_format)
    return Models(cfg, ours, theirs, sample_unets, train_unets)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(m: Models) -> tuple[dict[str, int], dict[str, int]]:
    """Each side's U-Net and VAE parameter counts."""
    return ({k: n_params(u) for k, u in m.sample_unets.items()},
            {"ours": n_params(m.ours.vae), "diffusers": n_params(m.theirs.vae)})


# ----------------------------------------------------------------------------- the workloads on the built models


def unet_workloads(m: Models, s: Settings) -> dict[str, dict[str, Callable]]:
    """(a) and (b) for both sides, on the U-Nets as they are now (compiled or not)."""
    fmt, sizes = s.memory_format, s.sizes

    def sample(dtype) -> dict[str, Callable]:
        return {k: make_sample_step(call_for(k, u), sizes.sample_batch, m.cfg, s.device, dtype, fmt)
                for k, u in m.sample_unets.items()}

    train = {k: make_train_step(k, u, call_for(k, u), sizes.train_batch, m.cfg, s.device, fmt)
             for k, u in m.train_unets.items()}
    return {"train": train, "sample": sample(None), "sample_bf16": sample(torch.bfloat16)}


class Generation:
    """(c) for both sides. Once the timers are attached (after FLOP counting and any compile), every
    run also records the share of its time spent outside the U-Net, from hooks on each U-Net call."""

    def __init__(self, m: Models, s: Settings):
        self.models, self.settings = m, s
        self.prompts = (PROMPTS * s.sizes.images)[: s.sizes.images]
        self.timers: dict[str, UNetTimer] = {}
        self.outside: dict[str, list[float]] = {k: [] for k in SIDES}

    def attach_timers(self) -> None:
        m, device = self.models, self.settings.device
        self.timers.update(ours=UNetTimer(m.ours.unet, device), diffusers=UNetTimer(m.theirs.unet, device))

    def runs(self) -> dict[str, Callable]:
        return {k: functools.partial(self.run, k) for k in SIDES}

    def run(self, side: str) -> None:
        m, s, sizes = self.models, self.settings, self.settings.sizes
        resolution = m.cfg.info.resolution
        timer = self.timers.get(side)
        if timer is not None:
            timer.reset()
        on_step = timer.step_done if timer is not None else None
        start = time.perf_counter()
        if side == "ours":
            m.ours.generate(self.prompts, steps=sizes.steps, guidance=sizes.guidance, seed=0, height=resolution,
                            width=resolution, batch_size=len(self.prompts), progress=on_step)
        else:
            diffusers_generate(m.theirs, self.prompts, sizes.steps, sizes.guidance, resolution, s.device, s.gen_dtype,
                               on_step)
        sync(s.device)
        if timer is not None:
            self.outside[side].append(timer.outside() / (time.perf_counter() - start))


def count_all_flops(runs: dict[str, dict[str, Callable]]) -> dict[str, dict[str, int]]:
    """FLOPs of each side's (a), (b) and (c), by torch.utils.flop_counter on both sides alike; before
    any torch.compile. Counting runs each workload once, so it doubles as the first warm-up run."""
    return {k: {key: count_flops(runs[key][k]) for key in ("train", "sample", "generate")} for k in SIDES}


def compile_unets(m: Models) -> None:
    for k in SIDES:
        m.sample_unets[k], m.train_unets[k] = torch.compile(m.sample_unets[k]), torch.compile(m.train_unets[k])
    m.ours.unet, m.theirs.unet = torch.compile(m.ours.unet), torch.compile(m.theirs.unet)


# ----------------------------------------------------------------------------- peak RSS, in child processes


def rss_child_main(side: str, quick: bool) -> None:
    """Child process: build one U-Net and train it; print its peak RSS and the RSS before the build.

    Both libraries are imported in every child, so the baselines match.
    """
    cfg, sizes = load_bench_config(quick), QUICK_SIZES if quick else Sizes()

    def build_and_train() -> None:
        torch.manual_seed(0)
        unet = no_zero_weights(UNet(cfg.unet)) if side == "ours" else build_diffusers_unet(cfg)
        step = make_train_step(side, unet, call_for(side, unet), sizes.train_batch, cfg, torch.device("cpu"))
        for _ in range(3):
            step()

    print(json.dumps(peak_rss_of(build_and_train)))


def start_peak_rss(quick: bool, threads: int) -> dict[str, subprocess.Popen]:
    """Start one fresh process per side to measure workload (a)'s peak RSS (see rss_child_main)."""
    cmd = [sys.executable, __file__, "--threads", str(threads)] + (["--quick"] if quick else [])
    return {k: subprocess.Popen(cmd + ["--rss-child", k], stdout=subprocess.PIPE, text=True) for k in SIDES}


def print_peak_rss(s: Settings, children: dict[str, subprocess.Popen] | None) -> None:
    """Wait for the peak-RSS children, starting them now if they have not been, and print the line."""
    if s.cuda:
        print("peak RSS: not measured on CUDA (the GPU memory is what matters there)")
        return
    if not s.measure_rss:
        return
    rss = collect_peak_rss(children or start_peak_rss(s.args.quick, s.args.threads))
    mib = {k: v["peak_kb"] / 1024 for k, v in rss.items()}
    grown = {k: (v["peak_kb"] - v["baseline_kb"]) / 1024 for k, v in rss.items()}
    print(f"peak RSS of (a), fresh process each: ours {mib['ours']:.0f} MiB, diffusers {mib['diffusers']:.0f} MiB "
          f"(ours/diffusers {mib['ours'] / mib['diffusers']:.3f}); above the imports: ours {grown['ours']:.0f} MiB, "
          f"diffusers {grown['diffusers']:.0f} MiB ({grown['ours'] / grown['diffusers']:.3f})")


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
          f"train FLOPs {flops['ours']['train'] / flops['diffusers']['train']:.4f}, "
          f"generate FLOPs {flops['ours']['generate'] / flops['diffusers']['generate']:.4f} (ours projects the "
          f"text's cross-attention keys and values once per batch, not at every step)")


def print_timing_row(label: str, median: dict[str, float], ratio: float, rate: dict[str, float],
                     pct: dict[str, float]) -> None:
    print(f"{label:24s} {median['ours'] * 1e3:10.1f} {median['diffusers'] * 1e3:13.1f} {ratio:7.3f}   "
          f"ours {rate['ours']:6.1f} ({pct['ours']:4.1f}%)  diffusers {rate['diffusers']:6.1f} ({pct['diffusers']:4.1f}%)")


def timing_table(runs: dict[str, dict[str, Callable]], flops, peak: dict[str, float], s: Settings) -> dict[str, float]:
    """Time every workload, interleaving the sides; print a row each; return diffusers' time / ours."""
    sizes = s.sizes
    # A generation takes long; the counting run was its warm-up, unless compiling has to happen.
    generate_warmup = 1 if s.args.compile else 0
    # key: (label, FLOP key, precision, extra warm-up runs)
    table = {
        "train": (f"train fp32 (b={sizes.train_batch})", "train", "fp32", sizes.warmup),
        "sample": (f"sample fp32 (b={sizes.sample_batch})", "sample", "fp32", sizes.warmup),
        "sample_bf16": (f"sample bf16 (b={sizes.sample_batch})", "sample", "bf16", sizes.warmup),
        "generate": (f"generate ({sizes.images} img)", "generate",
                     "bf16" if s.gen_dtype == torch.bfloat16 else "fp32", generate_warmup),
    }
    print("(a)'s AdamW: ours fused (as train.py builds it), diffusers torch's default (as train_text_to_image.py)")
    print(f"\n{'workload':24s} {'ours ms':>10s} {'diffusers ms':>13s} {'ratio':>7s}   GFLOP/s (% of matmul peak)")
    ratios = {}
    for key, (label, flop_key, precision, warmup) in table.items():
        times = interleaved(runs[key], sizes.repeats, warmup, s.device, sizes.min_seconds, sizes.max_repeats)
        median = {k: statistics.median(v) for k, v in times.items()}
        ratios[key] = median["diffusers"] / median["ours"]
        rate = {k: flops[k][flop_key] / median[k] / 1e9 for k in SIDES}
        pct = {k: 100 * rate[k] * 1e9 / peak[precision] for k in SIDES}
        print_timing_row(label, median, ratios[key], rate, pct)
    return ratios


def print_generation_overhead(outside: dict[str, list[float]]) -> None:
    share = {k: 100 * statistics.median(v) for k, v in outside.items()}
    print(f"\ngeneration time outside the U-Net (scheduler, CFG, noise; median): "
          f"ours {share['ours']:.2f}%, diffusers {share['diffusers']:.2f}%")


def print_ratios(ratios: dict[str, float]) -> None:
    print(f"train_ratio={ratios['train']:.3f} sample_ratio={ratios['sample']:.3f} "
          f"sample_bf16_ratio={ratios['sample_bf16']:.3f} generate_ratio={ratios['generate']:.3f}")


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads, the same for both sides (default: torch's, the physical cores)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per workload, at least (default 5, more for short workloads; 2 with --quick)")
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
    settings = set_up(args)
    # The peak-RSS children run side by side (each process's peak is its own). With --quick they
    # start now and overlap the timings, which --quick does not care about; else after them.
    rss_children = start_peak_rss(args.quick, args.threads) if settings.measure_rss and args.quick else None
    models = build_both_sides(settings)
    params, vae_params = parameter_counts(models)
    generation = Generation(models, settings)
    runs = {**unet_workloads(models, settings), "generate": generation.runs()}
    flops = count_all_flops(runs)
    if args.compile:
        compile_unets(models)
        runs.update(unet_workloads(models, settings))
    generation.attach_timers()
    peak = matmul_peaks(settings.device, settings.args.quick)
    print_sizes(params, vae_params, flops, settings.sizes)
    ratios = timing_table(runs, flops, peak, settings)
    print_generation_overhead(generation.outside)
    print_peak_rss(settings, rss_children)
    print_ratios(ratios)


if __name__ == "__main__":
    main()
