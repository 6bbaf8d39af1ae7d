"""Measuring tools of the benchmark: wall-clock timing, FLOP counting, the time a generation spends
outside its U-Net, and peak RSS (Linux only)."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Callable

import torch
from torch.utils import flop_counter

from diffusion.models import cpu_attention, cpu_conv


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable], repeats: int, warmup: int, device, min_seconds: float = 0.0,
                max_repeats: int = 0) -> dict[str, list[float]]:
    """Times of each side's fn, run alternately (A B A B ...) so that machine noise hits both alike:
    `repeats` rounds, and more, up to `max_repeats`, until the rounds add up to `min_seconds`, so that
    the median of a short workload does not rest on a few seconds of a shared machine."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    rounds, elapsed = 0, 0.0
    while rounds < repeats or (elapsed < min_seconds and rounds < max_repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
            elapsed += times[k][-1]
        rounds += 1
    return times


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, tries: int = 5) -> float:
    """This machine's best square-matmul rate in FLOP/s, measured now: the yardstick for `% of peak`."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up: thread pool and kernel selection
    return 2 * n**3 / min(timed(lambda: a @ b, device) for _ in range(tries))


def matmul_peaks(device: torch.device, quick: bool) -> dict[str, float]:
    """The matmul peak per precision ("fp32", "bf16") in FLOP/s, measured now; bf16 falls back to the
    fp32 peak where bf16 matmuls are slower (no bf16 hardware: autocast's kernels widen to fp32 and back)."""
    cuda = device.type == "cuda"
    # A CPU without bf16 instructions multiplies bf16 at ~1 GFLOP/s: a smaller matrix keeps that to a second.
    peak = {"fp32": matmul_peak(device, torch.float32, 512 if quick else 2048),
            "bf16": matmul_peak(device, torch.bfloat16, 256 if quick else 2048 if cuda else 512)}
    print(f"matmul peak (measured now): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s")
    if peak["bf16"] < peak["fp32"]:
        print("  (bf16 matmuls are slower than fp32 here, so bf16 rates below are given against the fp32 peak)")
        peak["bf16"] = peak["fp32"]
    return peak


def register_cpu_op_flops() -> None:
    """flop_counter knows the CUDA attention kernels but not the CPU one SDPA picks, nor our CPU ops
    (diffusion.models.cpu_attention and cpu_conv): count them alike."""
    cpu_attention.register_flop_formulas()
    cpu_conv.register_flop_formulas()
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


def peak_rss_of(workload: Callable[[], object]) -> dict[str, int]:
    """Run workload in this process; return its peak RSS and the RSS before it, in KiB.

    The peak so far (imports included) is cleared first (Linux's clear_refs), so VmHWM is the
    workload's own peak.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    baseline_kb = _status_kb("VmRSS")
    workload()
    return {"peak_kb": _status_kb("VmHWM"), "baseline_kb": baseline_kb}


def collect_peak_rss(children: dict[str, subprocess.Popen]) -> dict[str, dict]:
    """Wait for each child and read the peak_rss_of() result it printed last, as JSON."""
    results = {}
    for k, child in children.items():
        out, _ = child.communicate()
        if child.returncode:
            raise RuntimeError(f"the peak-RSS child for {k} failed with exit code {child.returncode}")
        results[k] = json.loads(out.strip().splitlines()[-1])
    return results
