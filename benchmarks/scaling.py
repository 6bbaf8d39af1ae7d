#!/usr/bin/env python
"""Time per training image and per generated image, ours against diffusers, along three sweeps.

    OMP_NUM_THREADS=2 python benchmarks/scaling.py --json benchmarks/scaling.json --plot benchmarks/scaling.png
    python benchmarks/scaling.py --quick              # tiny sizes, the same code paths, for the test suite
    python benchmarks/scaling.py --device cuda --dtype bf16

Model: the quick-start U-Net of configs/shapes.yaml (channel_mult [1, 2], one res block per level,
4 heads, context 16 x 64, f = 4 VAE), with unet.model_channels set by the sweep, and attention at
level 1 (the lower resolution) and in the middle block only. The quick start also attends at level
0; at latent 64 that is self-attention over 4096 tokens with 8-wide heads, where the CPU attention
kernel runs at a few GFLOP/s: that one row would take longer than all the others together. So every
row, the base point included, attends at level 1 only, and the sweeps stay comparable.

Sweeps, one variable at a time around the base point latent 16 (64 x 64 images), batch 8, width 32:
    latent  8, 16, 32, 64     the latent side; the image side is latent x 4
    batch   1, 8, 32
    width   32, 64, 128       unet.model_channels
The base point is measured once and appears in all three sweeps.

Per row and side:
    train     one training step (forward, backward, AdamW update: workloads.make_train_step, each
              side's optimizer as its training script builds it) / batch
    generate  10 DDIM steps with classifier-free guidance, each one U-Net call on 2B inputs, / batch.
              Both U-Nets run in the same loop (our samplers.ddim and classifier_free_guidance), so
              only the U-Net differs; no text encoder and no VAE decode (random contexts stand in).
Each workload runs once under torch.utils.flop_counter (the warm-up), then A B A B ..., and the
time is the minimum of 3 repeats. GFLOP/s is the counted FLOPs over that time, and its share is
against this machine's matmul peak, measured at the start of the run in the rows' dtype.
`--dtype bf16` runs every row under bf16 autocast (the weights stay fp32, as in training); on a
CPU without bf16 instructions it is several times slower and the share is then given against the
fp32 peak (measure.matmul_peaks).

Runtime of the default run on the 2-core AMD EPYC: about 6 minutes on one core (from timing its
rows' steps single-threaded), so 4-6 minutes on two, longer while other processes share them; the
latent-64 and width-128 rows take two thirds of it. --quick: a few seconds after the imports.
"""

from __future__ import annotations

import os

# As in bench_unet.py: spinning OpenMP waits stall each other on shared cores; set before torch loads,
# and only when run as a script.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import diffusers  # noqa: E402

from benchmarks.bench_unet import machine_line  # noqa: E402
from benchmarks.measure import count_flops, interleaved, matmul_peaks, register_cpu_op_flops  # noqa: E402
from benchmarks.sides import SIDES, build_diffusers_unet, no_zero_weights  # noqa: E402
from benchmarks.workloads import Sizes, call_for, make_train_step, unet_inputs  # noqa: E402
from diffusion.config import PipelineConfig, load_config  # noqa: E402
from diffusion.models.unet import UNet  # noqa: E402
from diffusion.samplers import classifier_free_guidance, ddim  # noqa: E402
from diffusion.schedule import NoiseSchedule, inference_timesteps  # noqa: E402

SHAPES = ROOT / "configs" / "shapes.yaml"
ATTENTION_LEVELS = (1,)  # see the docstring: level 0 at latent 64 would dominate the run
WORKLOADS = ("train", "generate")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Point:
    latent: int  # side of the latent; the image side is latent x the VAE factor
    batch: int
    width: int  # unet.model_channels


@dataclass
class Plan:
    base: Point
    sweeps: dict[str, tuple[int, ...]]  # Point field -> its values, the others held at base
    steps: int  # sampling steps per generated image
    repeats: int


PLAN = Plan(Point(latent=16, batch=8, width=32), {"latent": (8, 16, 32, 64), "batch": (1, 8, 32), "width": (32, 64, 128)},
            steps=10, repeats=3)
QUICK_PLAN = Plan(Point(latent=4, batch=2, width=8), {"latent": (4, 8), "batch": (1, 2), "width": (8, 16)},
                  steps=2, repeats=1)


# ----------------------------------------------------------------------------- the two sides at one point


def point_config(base: PipelineConfig, p: Point) -> PipelineConfig:
    unet = dataclasses.replace(base.unet, model_channels=p.width, attention_levels=ATTENTION_LEVELS)
    info = dataclasses.replace(base.info, resolution=p.latent * base.vae.factor)
    return dataclasses.replace(base, unet=unet, info=info)


def build_unets(cfg: PipelineConfig, device, memory_format) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    unets = {"ours": no_zero_weights(UNet(cfg.unet)), "diffusers": build_diffusers_unet(cfg)}
    return {k: u.to(device, memory_format=memory_format) for k, u in unets.items()}


def under_autocast(fn: Callable, device, dtype) -> Callable:
    """fn run under autocast to dtype; fn itself for fp32."""
    if dtype == torch.float32:
        return fn

    def run():
        with torch.autocast(device.type, dtype=dtype):
            return fn()

    return run


def make_generate_step(call, batch, cfg, steps, device, dtype, memory_format) -> Callable:
    """`steps` DDIM steps with classifier-free guidance on a batch: the U-Net's share of generation."""
    x, _, context, _ = unet_inputs(batch, cfg, device, memory_format)
    uncond = torch.zeros_like(context)  # stands in for the embedding of "": the values do not change the work
    model = classifier_free_guidance(call, context, uncond, Sizes.guidance)
    abar = NoiseSchedule(cfg.schedule).alphas_cumprod
    d = cfg.sampling
    timesteps = inference_timesteps(cfg.schedule.num_train_timesteps, steps, d.timestep_spacing, d.steps_offset).to(device)

    def generate():
        with torch.inference_mode():
            return ddim(model, x, abar, timesteps)

    return under_autocast(generate, device, dtype)


def train_step(side, unet, cfg, p: Point, device, dtype, memory_format) -> Callable:
    """One training step on a copy of unet, so that generation keeps the untrained weights."""
    unet = copy.deepcopy(unet)
    step = make_train_step(side, unet, call_for(side, unet), p.batch, cfg, device, memory_format)
    return under_autocast(step, device, dtype)


def workloads_at(cfg, p: Point, plan: Plan, device, dtype, memory_format) -> dict[str, dict[str, Callable]]:
    """{workload: {side: fn}} at one point."""
    unets = build_unets(cfg, device, memory_format)
    return {
        "train": {k: train_step(k, u, cfg, p, device, dtype, memory_format) for k, u in unets.items()},
        "generate": {k: make_generate_step(call_for(k, u.eval()), p.batch, cfg, plan.steps, device, dtype, memory_format)
                     for k, u in unets.items()},
    }


# ----------------------------------------------------------------------------- measuring


def measure_point(cfg, p: Point, plan: Plan, device, dtype, memory_format) -> dict[str, dict[str, dict[str, float]]]:
    """{workload: {side: seconds and GFLOP per image}}. Each fn's FLOP-counting run is its warm-up;
    then the sides alternate, and each keeps its fastest repeat (the least disturbed by other load)."""
    measured = {}
    for workload, fns in workloads_at(cfg, p, plan, device, dtype, memory_format).items():
        flops = {k: count_flops(fn) for k, fn in fns.items()}
        times = interleaved(fns, plan.repeats, 0, device)
        measured[workload] = {k: {"seconds_per_image": min(times[k]) / p.batch, "gflop_per_image": flops[k] / p.batch / 1e9}
                              for k in SIDES}
    return measured


def rows_of(sweep: str, p: Point, measured, peak: float, vae_factor: int) -> list[dict]:
    rows = []
    for workload, by_side in measured.items():
        for side, m in by_side.items():
            rate = m["gflop_per_image"] / m["seconds_per_image"]
            rows.append(dict(sweep=sweep, value=getattr(p, sweep), workload=workload, side=side, **dataclasses.asdict(p),
                             resolution=p.latent * vae_factor, **m, gflop_per_s=rate, peak_share=rate * 1e9 / peak))
    return rows


def run_sweeps(plan: Plan, base_cfg: PipelineConfig, peak: float, device, dtype, memory_format) -> list[dict]:
    """Every row of every sweep, printed as it is measured; the base point is measured once."""
    measured: dict[Point, dict] = {}
    rows: list[dict] = []
    for sweep, values in plan.sweeps.items():
        print_sweep_header(sweep, plan.base)
        for value in values:
            p = dataclasses.replace(plan.base, **{sweep: value})
            if p not in measured:
                measured[p] = measure_point(point_config(base_cfg, p), p, plan, device, dtype, memory_format)
            new = rows_of(sweep, p, measured[p], peak, base_cfg.vae.factor)
            print_rows(new)
            rows += new
    return rows


# ----------------------------------------------------------------------------- report


def print_header(plan: Plan, base_cfg: PipelineConfig, machine: str, dtype_name: str) -> None:
    u, f, b = base_cfg.unet, base_cfg.vae.factor, plan.base
    print(machine)
    print(f"U-Net: configs/shapes.yaml's (channel_mult {list(u.channel_mult)}, {u.num_res_blocks} res block, {u.num_heads} heads, "
          f"context {base_cfg.text_encoder.context_length}x{u.context_dim}), attention at level "
          f"{', '.join(map(str, ATTENTION_LEVELS))} and the middle only; image side = latent x {f}")
    print(f"base point: latent {b.latent} ({b.latent * f}x{b.latent * f} images), batch {b.batch}, width {b.width}; {dtype_name}")
    print(f"train: one step (forward, backward, AdamW) / batch; generate: {plan.steps} DDIM steps with CFG "
          f"(one U-Net call on 2B inputs each) / batch, no text encoder, no VAE decode")
    print(f"fastest of {plan.repeats} interleaved repeats after a FLOP-counting warm-up run; "
          "ratio = diffusers / ours (above 1: ours is faster)")


def print_sweep_header(sweep: str, base: Point) -> None:
    held = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(base).items() if k != sweep)
    print(f"\n{sweep} sweep ({held})")
    print(f"{sweep:>7s} {'workload':9s} {'ours ms/img':>12s} {'diffusers ms/img':>17s} {'ratio':>6s}   "
          "GFLOP/img   GFLOP/s (share of matmul peak)")


def print_rows(rows: list[dict]) -> None:
    """One line per workload, both sides side by side."""
    for workload in WORKLOADS:
        by_side = {r["side"]: r for r in rows if r["workload"] == workload}
        o, d = by_side["ours"], by_side["diffusers"]
        print(f"{o['value']:>7d} {workload:9s} {o['seconds_per_image'] * 1e3:12.2f} {d['seconds_per_image'] * 1e3:17.2f} "
              f"{d['seconds_per_image'] / o['seconds_per_image']:6.3f}   {o['gflop_per_image']:9.3f}   "
              f"ours {o['gflop_per_s']:6.1f} ({100 * o['peak_share']:5.1f}%)  "
              f"diffusers {d['gflop_per_s']:6.1f} ({100 * d['peak_share']:5.1f}%)")


PLOT_NEEDS = '--plot needs matplotlib: pip install -e ".[bench]"'


def plot_rows(rows: list[dict], plan: Plan, path: Path) -> None:
    """Time per image against each swept variable, one panel per sweep, both sides, log-log."""
    try:
        import matplotlib
    except ImportError:
        sys.exit(PLOT_NEEDS)
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plan.sweeps), figsize=(5 * len(plan.sweeps), 4.2), sharey=True)
    for ax, (sweep, values) in zip(axes, plan.sweeps.items()):
        for side, color in zip(SIDES, ("tab:blue", "tab:orange")):
            for workload, style in zip(WORKLOADS, ("-o", "--s")):
                mine = [r for r in rows if r["sweep"] == sweep and r["side"] == side and r["workload"] == workload]
                ax.plot([r["value"] for r in mine], [r["seconds_per_image"] for r in mine], style, color=color,
                        label=f"{side}, {workload}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_xlabel({"latent": "latent side", "batch": "batch size", "width": "unet.model_channels"}[sweep])
        ax.set_title(f"{sweep} sweep")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"seconds per image (generate: {plan.steps} CFG steps)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: the same code paths in seconds")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="bf16: every row under bf16 autocast")
    p.add_argument("--json", type=Path, help="write the header and the rows here")
    p.add_argument("--plot", type=Path, help="write a PNG of time per image against each swept variable")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # fail now, not after the run
        sys.exit(PLOT_NEEDS)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    plan = QUICK_PLAN if args.quick else PLAN
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    # As bench_unet.py: channels_last weights and inputs on both sides on a GPU.
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    diffusers.utils.logging.set_verbosity_error()
    register_cpu_op_flops()
    base_cfg = load_config(SHAPES).pipeline_config()
    machine = machine_line(device, torch.get_num_threads())
    print_header(plan, base_cfg, machine, args.dtype)
    peak = matmul_peaks(device, args.quick)[args.dtype]
    rows = run_sweeps(plan, base_cfg, peak, device, dtype, memory_format)
    if args.json:
        header = dict(machine=machine, device=args.device, dtype=args.dtype, threads=torch.get_num_threads(),
                      steps=plan.steps, repeats=plan.repeats, base=dataclasses.asdict(plan.base), sweeps=plan.sweeps,
                      attention_levels=list(ATTENTION_LEVELS), peak_gflop_per_s=peak / 1e9)
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_rows(rows, plan, args.plot)
    return rows


if __name__ == "__main__":
    main()
