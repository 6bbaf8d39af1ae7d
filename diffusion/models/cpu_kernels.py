"""The toolkit's C++ kernels for the CPU, built once per machine and loaded with ctypes.

attention_cpu.cpp (softmax attention for narrow heads, diffusion.models.cpu_attention) and
group_norm_cpu.cpp (GroupNorm and SiLU with their backward pass, diffusion.models.cpu_norm) compile into one
library, with no PyTorch headers: about 5 s with g++ on first use, into a cache directory keyed by
the sources, the flags and the CPU. Where that cannot happen (no compiler, not Linux or macOS,
DIFFUSION_CPU_KERNELS=0), `available()` is False and the layers use PyTorch's own operators.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = [HERE / "attention_cpu.cpp", HERE / "group_norm_cpu.cpp"]
HEADERS = [HERE / "cpu_vec.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("DIFFUSION_KERNEL_CACHE", Path(root) / "diffusion-kernels"))


def cpu_signature() -> str:
    """What -march=native compiles for: the CPU model and its flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "\n".join([platform.machine(), *lines])


def build(compiler: str) -> Path:
    """Compile the sources unless these sources, these flags and this CPU already have a library."""
    texts = [p.read_text() for p in SOURCES + HEADERS]
    key = hashlib.sha256("\n".join([*texts, compiler, *FLAGS, cpu_signature()]).encode()).hexdigest()[:16]
    lib = cache_dir() / f"cpu_kernels-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes that start together (torchrun) never load a half-written file.
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(out)], check=True, capture_output=True, text=True)
        os.replace(out, lib)
    return lib


_UNLOADED = object()
_library: ctypes.CDLL | None | object = _UNLOADED


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built and loaded on the first call; None where they cannot be."""
    global _library
    if _library is _UNLOADED:
        _library = _load()
    return _library


def loaded() -> bool:
    """Whether an earlier call has loaded the library. Inside a torch.compile trace nothing can be
    built, so the ops run there only if building a layer loaded the library before."""
    return _library is not None and _library is not _UNLOADED


def available() -> bool:
    return library() is not None


def _load() -> ctypes.CDLL | None:
    if os.environ.get("DIFFUSION_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None or platform.system() not in ("Linux", "Darwin"):
        log.info("CPU kernels unavailable (no C++ compiler); using PyTorch's attention and group norm")
        return None
    try:
        lib = ctypes.CDLL(str(build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("CPU kernels did not build (%s); using PyTorch's attention and group norm",
                    detail.strip().splitlines()[-1] if detail.strip() else type(e).__name__)
        return None
    i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    lib.attention_forward.argtypes = [ptr] * 5 + [i32] * 5 + [i64] * 12 + [f32, i32]
    lib.attention_backward.argtypes = [ptr] * 9 + [i32] * 5 + [i64] * 15 + [f32, i32]
    lib.group_norm_forward.argtypes = [ptr] * 4 + [i32, i64, i32, i32, f32, i32, i32]
    lib.group_norm_backward.argtypes = [ptr] * 7 + [i32, i64, i32, i32, f32, i32, i32]
    for fn in (lib.attention_forward, lib.attention_backward, lib.group_norm_forward, lib.group_norm_backward):
        fn.restype = i32
    return lib
