"""What the hardware at hand supports, and the `auto` choices of precision and compilation that follow.

bf16 pays only with bf16 arithmetic in silicon: CUDA GPUs from Ampere on, and CPUs with AMX or
AVX512-BF16. Elsewhere PyTorch emulates it: a bf16 matmul ran at 1.2-1.3 GFLOP/s against 84-140 in
fp32 on a 2-core AMD EPYC. torch.compile is meant for GPUs, where kernel launches dominate small
models; on a 2-core CPU it saved under 4% of the quick start's U-Net and VAE training steps (200 -> 197
ms and 245 -> 238 ms) and took 22 s and 117 s to compile, so `auto` leaves CPUs eager.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import NamedTuple

import torch

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic


class Choice(NamedTuple):
    value: str
    reason: str


@functools.lru_cache(maxsize=None)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native-bf16 flags this CPU reports ((): none, or not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def bf16_support(device: torch.device) -> Choice:
    """("bf16", why) where the device has bf16 arithmetic in hardware, else ("no", why not)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Choice("bf16", f"{torch.cuda.get_device_name(device)} has bf16 tensor cores")
        return Choice("no", f"{torch.cuda.get_device_name(device)} has no native bf16")
    flags = cpu_bf16_flags()
    if flags:
        return Choice("bf16", f"this CPU has {' and '.join(flags)}")
    return Choice("no", "this CPU has neither AMX nor AVX512-BF16, so bf16 would be emulated")


def resolve_mixed_precision(setting: str, device: torch.device) -> Choice:
    """training.mixed_precision: `auto` becomes bf16 or no by bf16_support; other settings stay."""
    if setting != "auto":
        return Choice(setting, "set in the config")
    return bf16_support(device)


def resolve_compile(setting: str, device: torch.device) -> Choice:
    """training.compile: `auto` compiles on a GPU and stays eager on a CPU."""
    if setting != "auto":
        return Choice(setting, "set in the config")
    if device.type == "cuda":
        return Choice("yes", "on a GPU, fused kernels save launches")
    return Choice("no", "on a CPU, compiling costs more time than it saves at these sizes")


def resolve_channels_last(setting: str, device: torch.device, precision: str) -> Choice:
    """training.channels_last: `auto` trains in NCHW in fp32 on a CPU, and in channels_last elsewhere.

    The models are built channels_last, which every bf16 path and GPU wants (on a CPU without bf16 hardware
    the NCHW bf16 convolutions run about 3x slower). But fp32 training on a CPU spends most of its time
    in the convolutions' and GroupNorms' backward passes, and oneDNN runs those faster in NCHW: on a 2-core
    AMD EPYC at one thread the quick start's VAE step took 4-30% less time and its U-Net step 0-8% less;
    at two threads the layouts were within noise of each other.
    """
    if setting != "auto":
        return Choice(setting, "set in the config")
    if device.type == "cpu" and precision == "no":
        return Choice("no", "fp32 on a CPU: the convolutions' and norms' backward passes run faster in NCHW")
    return Choice("yes", "channels_last suits a GPU and bf16")


def compiler_missing(device: torch.device) -> str | None:
    """Why torch.compile cannot run on `device` (None: it can). On a CPU inductor builds C++ kernels, and
    without a compiler it would fail only at the first forward, deep in a traceback."""
    if device.type != "cpu":
        return None
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return "torch.compile on a CPU builds C++ kernels, and no C++ compiler was found: install g++ (or set CXX)"
    return None


def quiet_compiler() -> None:
    """Silence the C++ extension loader's note that a CPU-only machine has no CUDA runtime, which every
    inductor compile on a CPU prints and which asks nothing of the user."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
