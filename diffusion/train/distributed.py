"""What several processes must agree on: per-rank random streams, the loss and the stop decision, equal
weights, and barriers. Every function here is a collective unless it says otherwise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import TrainError
from ..io.weights import state_hash
from .checkpoints import rng_state

DEBUG_ENV = "DIFFUSION_DEBUG_DIR"  # tests: each rank appends the sample indices it reads to <dir>/rank<r>.jsonl


def make_generator(accelerator, seed: int, stream: int) -> torch.Generator:
    """This rank's generator for noise, timesteps and caption dropout: independent per (seed, rank, stream)."""
    device = accelerator.device if accelerator.device.type != "cpu" else "cpu"
    state = np.random.SeedSequence([seed, accelerator.process_index, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) >> 1)


def gather_rng(accelerator, generator: torch.Generator) -> list[dict]:
    """Every rank's RNG states, in rank order (a collective: call it on every rank)."""
    mine = rng_state(generator)
    if accelerator.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    return gather_object([mine])


def agree(accelerator, loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
    """(the loss averaged over ranks, whether any rank asks to stop), in one collective so all ranks act alike.

    A non-finite loss on any rank makes the average non-finite on every rank.
    """
    stats = torch.stack([loss.detach().float(), torch.tensor(float(stop), device=loss.device)])
    if accelerator.num_processes > 1:
        stats = accelerator.reduce(stats, "mean")
    return float(stats[0]), bool(stats[1] > 0)


def check_same(accelerator, value, problem: str):
    """`value`, after checking that every rank holds the same one (a collective); else TrainError(problem)."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        values = gather_object([value])
        if len({repr(v) for v in values}) != 1:
            raise TrainError(f"{problem} (per rank: {values})")
    return value


def check_in_sync(accelerator, module: nn.Module | dict, what: str) -> str:
    """The weights' hash, after checking that every rank holds the same weights (a collective)."""
    return check_same(accelerator, state_hash(module), f"the {what} weights differ between processes")


def barrier(accelerator) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def debug_record(accelerator, **fields) -> None:
    """Append fields to $DIFFUSION_DEBUG_DIR/rank<r>.jsonl (tests check sharding and weight sync with it)."""
    folder = os.environ.get(DEBUG_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / f"rank{accelerator.process_index}.jsonl", "a") as f:
            f.write(json.dumps(fields) + "\n")
