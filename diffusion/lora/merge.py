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
    where = f"not found in {', '.join(str(d) for d in dirs)}" if dirs else "not found: no LoRA folder was given"
    raise LoRAError(f"LoRA '{name}' {where}; pass --lora-dir with the folder that holds {name}.safetensors")


def split_prompt_tags(prompts: list[str], what: str = "the prompt") -> tuple[list[str], list[tuple[str, float]]]:
    """The prompts without their `<lora:name:m>` tags (what the text encoder sees), and the tags.

    Adapters are merged into the weights, so one generate() call has one stack: every prompt must
    carry the same tags (a prompt without tags among tagged ones would still get the adapters).
    """
    from ..errors import UsageError
    from ..infotext import split_lora_tags

    clean, tag_sets = [], []
    for prompt in prompts:
        try:
            text, tags = split_lora_tags(prompt)
        except ValueError as e:
            raise UsageError(f"{what}: {e}") from None
        clean.append(text)
        tag_sets.append(tags)
    for i, tags in enumerate(tag_sets[1:], start=2):
        if tags != tag_sets[0]:
            raise UsageError(f"{what}: prompt {i} carries {_tags(tags)} but prompt 1 carries {_tags(tag_sets[0])}; "
                             "give every prompt the same <lora:...> tags, or pass the adapters with --lora")
    return clean, tag_sets[0] if tag_sets else []


def _tags(tags: list[tuple[str, float]]) -> str:
    return " ".join(f"<lora:{name}:{m:g}>" for name, m in tags) or "no tags"


def resolve_stack(specs: list[str] | None, tags: list[tuple[str, float]] = (), dirs: list[str | Path] | None = None,
                  recorded: tuple[tuple[str, float, str], ...] = (), recorded_from: str = "the image") -> list[tuple[LoRA, float]]:
    """The adapters a generation asks for: --lora FILE[:MULT] flags, then prompt tags, else an infotext's.

    Tags and recorded adapters are named without a folder: NAME.safetensors is looked up in dirs, then
    in the folders of the flags' files. Flags replace recorded adapters (as flags replace any other
    recorded value); a recorded one whose file hashes differently is used with a warning.
    """
    from ..errors import warn

    stack = [(_read_spec(path), multiplier) for path, multiplier in map(parse_spec, specs or [])]
    folders = list(dict.fromkeys([Path(d) for d in dirs or []] + [Path(parse_spec(s)[0]).parent for s in specs or []]))
    for name, multiplier in tags:
        stack.append((read_lora(find_in_dirs(name, folders)), multiplier))
    if specs or tags:
        return stack
    for name, multiplier, recorded_hash in recorded:
        path = find_in_dirs(name, folders)
        lora = read_lora(path)
        if recorded_hash and lora.hash != recorded_hash:
            warn(f"{recorded_from} was made with LoRA {name} hash {recorded_hash}, but {path} is {lora.hash}; the pixels will differ")
        stack.append((lora, multiplier))
    return stack


def _read_spec(path: str) -> LoRA:
    """read_lora, but a FILE:SCALE whose SCALE is not a number (parse_spec then kept it all as the path) says so."""
    head, sep, tail = path.rpartition(":")
    if sep and head and not Path(path).exists() and Path(head).is_file():
        raise LoRAError(f"LoRA {path}: the scale '{tail}' is not a number; write FILE:SCALE, e.g. {head}:0.8")
    return read_lora(path)
