"""Tensor-by-tensor correspondences between our state dicts and Stable Diffusion's layouts.

A Link says how one of our tensors is made from tensors of another layout. Our attention fuses the
q, k, v projections (and a cross-attention's k, v) into one matrix, so a link may name several
source tensors, stacked along dim 0; SD's original VAE keeps its attention projections as 1x1
convs, so a link may also drop or add two trailing unit dims. Both are exact: a round trip gives
back the same bits. The expected shapes come from our model built on the meta device, so every
source tensor is checked before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn

from .weights import WeightsError

# A module's sub-layers: our name -> the source names that stack into it ("" is the module itself).
Table = dict[str, tuple[str, ...]]
PLAIN: Table = {"": ("",)}


class Link(NamedTuple):
    native: str
    sources: tuple[str, ...]
    conv1x1: bool = False  # each source is a (C_out, C_in, 1, 1) conv weight standing for a Linear's


def join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def expand(native_keys: Iterable[str], native: str, source: str, table: Table, conv1x1: bool = False) -> list[Link]:
    """The links of one module pair: each weight and bias that our model actually has."""
    keys = set(native_keys)
    links = []
    for ours, theirs in table.items():
        for param in ("weight", "bias"):
            key = join(native, ours, param)
            if key in keys:
                links.append(Link(key, tuple(join(source, s, param) for s in theirs), conv1x1 and param == "weight"))
    return links


def link_modules(native_keys: Iterable[str], pairs: Iterable[tuple[str, str, Table]]) -> list[Link]:
    """All links of a model, from its (our prefix, source prefix, table) module pairs."""
    keys = list(native_keys)
    links = [link for native, source, table in pairs for link in expand(keys, native, source, table)]
    unlinked = sorted(set(keys) - {link.native for link in links})
    if unlinked:
        raise WeightsError(f"no mapping for our tensor {unlinked[0]} (an architecture these layouts cannot express)")
    return links


def native_shapes(build: Callable[[], nn.Module]) -> dict[str, tuple[int, ...]]:
    """Our model's tensor shapes, built on the meta device so that even SD's size costs no memory."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build().state_dict().items()}


def source_shape(link: Link, native_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape each of a link's source tensors must have."""
    shape = (native_shape[0] // len(link.sources), *native_shape[1:])
    return (*shape, 1, 1) if link.conv1x1 else shape


def _more(names: list[str]) -> str:
    return f" (+{len(names) - 1} more)" if len(names) > 1 else ""


def check_keys(state: dict[str, torch.Tensor], expected: Iterable[str], what: str) -> None:
    """WeightsError naming the first unexpected, then the first missing tensor."""
    expected = set(expected)
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise WeightsError(f"{what}: unexpected tensor {unexpected[0]}{_more(unexpected)}")
    missing = sorted(expected - set(state))
    if missing:
        raise WeightsError(f"{what}: missing tensor {missing[0]}{_more(missing)}")


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise WeightsError(f"{what}: tensor {name} has shape {tuple(tensor.shape)}, the architecture needs {shape}")


def to_native(state: dict[str, torch.Tensor], links: list[Link], shapes: dict[str, tuple[int, ...]], what: str) -> dict[str, torch.Tensor]:
    """Our state dict from a source layout's, checking every key and shape first."""
    check_keys(state, (s for link in links for s in link.sources), what)
    out = {}
    for link in links:
        shape = shapes[link.native]
        for name in link.sources:
            check_shape(name, state[name], source_shape(link, shape), what)
        parts = [state[name] for name in link.sources]
        out[link.native] = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(shape)
    return out


def from_native(state: dict[str, torch.Tensor], links: list[Link], shapes: dict[str, tuple[int, ...]], what: str) -> dict[str, torch.Tensor]:
    """A source layout's state dict from ours: the exact inverse of to_native."""
    check_keys(state, shapes, what)
    out = {}
    for link in links:
        tensor = state[link.native]
        check_shape(link.native, tensor, shapes[link.native], what)
        shape = source_shape(link, shapes[link.native])
        for name, part in zip(link.sources, tensor.chunk(len(link.sources))):
            out[name] = part.reshape(shape)
    return out


def count_indices(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered children `prefix` has: 1 + the largest N among keys `prefix`N`.`..."""
    heads = (k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix))
    return max((int(h) + 1 for h in heads if h.isdigit()), default=0)


def require(state: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in state:
        raise WeightsError(f"{what}: missing tensor {key}")
    return state[key]


def multiples(widths: list[int], base: int, what: str) -> tuple[int, ...]:
    """Per-level width multipliers of the base width, as our configs hold them."""
    if any(w % base for w in widths):
        raise WeightsError(f"{what}: level widths {widths} are not multiples of the base width {base}")
    return tuple(w // base for w in widths)
