"""The command-line convention that every entry point shares (train.py, sample.py, app.py, `python -m diffusion.*`).

- Exit status 0: done. 1: a problem met while doing the work (data, weights, a model folder, a
  diverging loss). 2: a bad command line or config, so nothing was done. 130: interrupted.
- Every error is one line on stderr, `error: ...`, with no traceback; a multi-process run prints it once.

An entry point parses with `ArgumentParser`, does its work in a function that raises `ToolkitError`s,
and exits with `sys.exit(run_main(work, argv))`.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import random
import sys
from typing import Callable, NoReturn, Sequence

from .errors import ToolkitError, UsageError, one_line, warn  # noqa: F401 - warn is re-exported for the scripts

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed

# At exit CPython collects garbage once more, walking every live object: with torch loaded that takes
# 0.5-1 s, a fifth of sample.py's cold start on 2 cores (benchmarks/README.md). Freezing first skips
# the walk; objects are still freed by reference count, and only cycles are left to the OS unfinalized,
# which loses nothing here (every file is written and closed under a `with`).
atexit.register(gc.freeze)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises UsageError (one line, exit status 2) instead of printing the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def run_main(work: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run work(argv) under the convention above and return the exit status."""
    if not gc.isenabled():  # an entry script paused the collector for its imports (sample.py)
        gc.freeze()  # what they made lives until exit: the collector need not walk it again
        gc.enable()
    try:
        work(argv)
        return 0
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except ToolkitError as e:
        code, message = e.exit_code, one_line(e)
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    if int(os.environ.get("RANK", "0")) == 0:  # one line from a multi-process run, not one per rank
        print(f"error: {message}", file=sys.stderr)
    return code


def add_device_args(parser: argparse.ArgumentParser) -> None:
    from .pipeline import DTYPES

    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="U-Net and text encoder; the VAE stays fp32")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the U-Net and warm it up before the first image (about 1.5 min on 2 CPU cores, "
                             "then ~1.2x faster generation there: for long runs and app.py)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model and the two choices that a single-file checkpoint cannot record for itself."""
    parser.add_argument("--model", help="a model: our model folder, a diffusers folder, or an SD .safetensors file")
    add_single_file_args(parser)


def add_single_file_args(parser: argparse.ArgumentParser) -> None:
    """--prediction-type and --ema: what an SD single file does not record for itself."""
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                        help="for a single file: what the U-Net predicts (default: the file's metadata, a sidecar .yaml, else epsilon)")
    parser.add_argument("--ema", choices=["auto", "on", "off"], default="auto",
                        help="for a single file: its EMA weights (model_ema.*) or the raw ones (default auto: EMA when present)")


def add_lora_args(parser: argparse.ArgumentParser, dirs: bool = True) -> None:
    """--lora FILE[:SCALE] (repeatable, stacks) and --lora-dir, where adapters named by prompt tags or a PNG are found."""
    parser.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                        help="apply a LoRA .safetensors with this multiplier (default 1); repeat to stack adapters")
    if dirs:
        parser.add_argument("--lora-dir", action="append", metavar="DIR",
                            help="where <lora:name:m> prompt tags and a PNG's adapters are looked up, as NAME.safetensors "
                                 "(repeatable; the folders of the --lora files are searched too)")


def load_model(path: str, device: str | None = None, dtype: str = "fp32", prediction_type: str | None = None, ema: str = "auto"):
    """Load a model in any format the toolkit reads; PipelineError (exit 1) says why one cannot be used."""
    import torch

    from .pipeline import load_pipeline

    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    return load_pipeline(path, device, dtype, prediction_type=prediction_type, ema=ema)


def compile_model(pipe, batch_size: int, **request) -> None:
    """--compile: compile the U-Net and warm it up for batch_size images (and the request's sampler, guidance
    and size: Pipeline.compile), saying how long it took and what it changes."""
    import time

    start = time.perf_counter()
    pipe.compile(batch_size, **request)
    print(
        f"--compile: the U-Net is compiled and warmed up for {batch_size} image(s) per batch in {time.perf_counter() - start:.1f} s; "
        "compiled kernels round differently from eager ones, so --from-png reproduces an image exactly only in the mode that made it",
        file=sys.stderr,
    )


def resolve_seed(seed: int, count: int = 1) -> int:
    """-1 picks a random seed; otherwise seeds seed .. seed + count - 1 must fit a generator (UsageError)."""
    if seed == -1:
        return random.randint(0, 2**32 - 1)
    if not 0 <= seed <= MAX_SEED - count:
        raise UsageError(f"seed must be -1 (random) or between 0 and {MAX_SEED - count}, got {seed}")
    return seed
