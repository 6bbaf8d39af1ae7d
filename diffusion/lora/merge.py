"""Adapters applied to a pipeline for generation: W = W_base + Σ multiplier·ΔW, merged into the weights.

Merging costs nothing per step, unlike running B·A beside every adapted layer. The sum is formed in
fp64 from an untouched copy of each base weight kept on the side, so changing or removing adapters
restores the base exactly, however often it is done (fusing and unfusing in fp16 drifts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .files import LoRAError, count_by_component, match, read_lora
from .network import LoRA
from .targets import pipeline_targets


@dataclass(frozen=True)
class Applied:
    """One adapter as generation applied it, for the infotext: `<lora:name:multiplier>` and its hash."""

    name: str
    multiplier: float
    hash: str


def parse_spec(spec: str) -> tuple[str, float]:
    """FILE[:MULTIPLIER] -> (FILE, multiplier); the multiplier defaults to 1."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def load_stack(specs: list[str]) -> list[tuple[LoRA, float]]:
    """Read each FILE[:MULTIPLIER]."""
    stack = []
    for spec in specs:
        path, multiplier = parse_spec(spec)
        stack.append((read_lora(path), multiplier))
    return stack


def apply_loras(pipe, stack: list[tuple[LoRA, float]]) -> list[Applied]:
    """Set pipe's weights to its base plus each adapter's multiplier·ΔW; an empty stack restores the base.

    Every adapter is matched against the model first (one line naming the first layer that does not
    fit), so a refused stack leaves the weights as they were.
    """
    targets = pipeline_targets(pipe)
    by_param: dict[tuple[str, str], list] = {}
    for lora, multiplier in stack:
        for t, layer in match(lora, targets, f"LoRA {lora.name}").items():
            by_param.setdefault((t.component, t.param), []).append((t, layer, multiplier))
    base: dict[tuple[str, str], torch.Tensor] = pipe.lora_base
    with torch.no_grad():
        for key in [k for k in base if k not in by_param]:  # weights no longer adapted go back to their base
            _param(pipe, key).copy_(base.pop(key))
        for key, layers in by_param.items():  # one weight at a time: the fp64 sum of SD's largest is 50 MB
            param = _param(pipe, key)
            base.setdefault(key, param.detach().clone())
            merged = base[key].to(param.device, torch.float64)
            for t, layer, multiplier in layers:
                merged[t.rows[0]:t.rows[1]] += multiplier * layer.delta(t.shape).to(param.device)
            param.copy_(merged.to(param.dtype))
    pipe.loras = [Applied(lora.name, multiplier, lora.hash) for lora, multiplier in stack]
    return pipe.loras


def _param(pipe, key: tuple[str, str]) -> torch.Tensor:
    component, name = key
    return getattr(pipe, component).get_parameter(name)


def describe(pipe, stack: list[tuple[LoRA, float]]) -> str:
    """One line per adapter: how many layers of each component it adapts."""
    targets = pipeline_targets(pipe)
    lines = []
    for lora, multiplier in stack:
        counts = count_by_component(match(lora, targets, f"LoRA {lora.name}"))
        parts = ", ".join(f"{n} {'U-Net' if c == 'unet' else 'text-encoder'} layers" for c, n in sorted(counts.items(), reverse=True))
        lines.append(f"LoRA {lora.name} ×{multiplier:g}: {parts}")
    return "\n".join(lines)


def find_in_dirs(name: str, dirs: list[Path]) -> Path:
    """A LoRA named in an infotext or a prompt tag: NAME.safetensors in one of dirs."""
    for folder in dirs:
        candidate = folder / f"{name}.safetensors"
        if candidate.is_file():
            return candidate
    where = ", ".join(str(d) for d in dirs) or "no folder (pass --lora-dir)"
    raise LoRAError(f"LoRA '{name}' not found in {where}; pass --lora-dir with the folder that holds {name}.safetensors")
