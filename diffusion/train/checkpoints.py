"""Checkpoints: one folder per saved step, written under a temporary name and renamed, and the
training state that makes a resumed run continue exactly where the interrupted one stopped.

    checkpoints/step-000500/
      meta.json                 step and the size of every file; written last, checked on load
      state.pt                  optimizer, LR scheduler, step, data position, every rank's RNG states
      *.safetensors             the weights (each stage names its own files)
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import TrainError, warn
from ..io.atomic import atomic_folder
from ..io.weights import WeightsError, load_weights_file

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint name under root, oldest first; temporaries are ignored."""
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


@contextlib.contextmanager
def write_checkpoint(root: Path, step: int, keep: int):
    """Yield a temporary folder to fill; on success record meta.json and rename it to step-XXXXXX.

    The rename is the commit: a kill at any point before it leaves the previous checkpoints as they
    were, and only a hidden temporary folder that the next save removes. The same step saved again
    (a resumed run that replaces a corrupt checkpoint) replaces the old folder. Then only the newest
    `keep` checkpoints are kept.
    """
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".step-*"):  # temporaries of saves that were killed
        shutil.rmtree(leftover, ignore_errors=True)
    with atomic_folder(checkpoint_dir(root, step)) as tmp:
        yield tmp
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "meta.json").write_text(json.dumps({"step": step, "files": files}, indent=1))
    for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """({file stem: state dict} for every .safetensors file, state.pt) of one checkpoint folder.

    Raises TrainError when anything is missing, truncated or unreadable.
    """
    try:
        meta = json.loads((path / "meta.json").read_text())
        for name, size in meta["files"].items():
            actual = (path / name).stat().st_size
            if actual != size:
                raise TrainError(f"{name} has {actual} bytes, expected {size} (truncated?)")
        weights = {p.stem: load_weights_file(p) for p in sorted(path.glob("*.safetensors"))}
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, WeightsError) as e:
        raise TrainError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return weights, state


def latest_checkpoint(root: Path, say: Callable[[str], None] = warn) -> Optional[tuple[Path, dict, dict]]:
    """(folder, weights, state) of the newest checkpoint that loads; broken ones are skipped with a warning."""
    for step, path in reversed(list_checkpoints(root)):
        try:
            return (path, *load_checkpoint(path))
        except TrainError as e:
            say(f"skipping checkpoint {path}: {e}; trying the previous one")
    return None


def save_training_state(path: Path, step: int, position: tuple[int, int], accelerator, optimizers, scheduler, rng: list[dict]) -> None:
    scaler = getattr(accelerator, "scaler", None)
    torch.save(
        {
            "step": step,
            "position": list(position),  # (epoch, batches read in it) of this rank's data order
            "world_size": accelerator.num_processes,
            "optimizers": [o.state_dict() for o in optimizers],
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,  # one entry per rank
        },
        path,
    )


def restore_training_state(state: dict, accelerator, optimizers, scheduler, generator: torch.Generator) -> tuple[int, tuple[int, int]]:
    """Load optimizers, scheduler, scaler and this rank's RNG states; returns (step, data position)."""
    for opt, saved in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(saved)
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] is not None and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    if len(rng) != accelerator.num_processes and accelerator.is_main_process:
        warn(f"the checkpoint was written by {len(rng)} processes and this run has {accelerator.num_processes}; "
             "training continues, but not exactly as an uninterrupted run would")
    set_rng_state(rng[accelerator.process_index % len(rng)], generator)
    return int(state["step"]), tuple(state["position"])


def rng_state(generator: torch.Generator) -> dict:
    """Every random state that training draws from: python, numpy, torch (CPU and CUDA) and our generator."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which torch.load(weights_only=True) refuses; store a tensor.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])
