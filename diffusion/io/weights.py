"""Reading and writing weights: safetensors only for our own files, with errors that name the tensors."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ToolkitError
from .atomic import atomic_file


class WeightsError(ToolkitError, ValueError):
    """A weights file that is unreadable or does not fit the model."""


def _summary(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a PyTorch .pt/.bin/.ckpt file loaded without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise WeightsError(f"cannot read weights file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__} (is it truncated or corrupt?)") from None
    # Lightning-style checkpoints nest the weights.
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return state


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strictly load `state`, raising WeightsError that names missing, unexpected and mis-shaped tensors."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {_summary(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_summary(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {_summary(misshaped)}")
    if problems:
        raise WeightsError(f"{what} does not match the model config; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def save_weights(module_or_state: nn.Module | dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write safetensors atomically: to a temporary name first, so a kill never leaves half a file.

    `metadata` goes into the file's header, as text.
    """
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    # safetensors refuses shared or non-contiguous storage; clone to plain contiguous tensors.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def state_hash(module_or_state: nn.Module | dict) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: equal hashes, equal weights."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        # flatten first: a size-1 last dim may carry any stride, which view(uint8) refuses
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()
