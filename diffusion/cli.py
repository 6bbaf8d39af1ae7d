"""Helpers shared by the command-line entry points (sample.py, app.py).

Every user mistake ends the program with one line that says what to fix, never a traceback.
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import NoReturn

import torch

from .pipeline import DTYPES, Pipeline, PipelineError, load_pipeline

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def fail(message: str) -> NoReturn:
    """Exit with status 1 and a one-line `error: ...` on stderr."""
    raise SystemExit("error: " + " ".join(str(message).split("\n")))


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (exit status 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="U-Net and text encoder; the VAE stays fp32")


def load_model(path: str, device: str | None = None, dtype: str = "fp32") -> Pipeline:
    """Load a saved pipeline, or exit with one line saying why it cannot be used."""
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but CUDA is not available here; use --device cpu")
    try:
        return load_pipeline(path, device, dtype)
    except PipelineError as e:
        fail(str(e))


def resolve_seed(seed: int, count: int = 1) -> int:
    """-1 picks a random seed; otherwise seeds seed .. seed + count - 1 must fit a generator."""
    if seed == -1:
        return random.randint(0, 2**32 - 1)
    if not 0 <= seed <= MAX_SEED - count:
        raise ValueError(f"seed must be -1 (random) or between 0 and {MAX_SEED - count}, got {seed}")
    return seed


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
