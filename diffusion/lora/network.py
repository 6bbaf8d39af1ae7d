"""One adapted layer's tensors and its weight update, and the trainable form that training attaches.

ΔW = (alpha / rank) · B·A (Hu et al. 2021, eq. 3, with kohya's and peft's alpha scaling), where A
("down", rank × in) and B ("up", out × rank). A convolution's A is a (rank, in, kh, kw) kernel and its
B a 1x1 (out, rank, 1, 1) one (LoCon), so B·A flattens to an (out, in·kh·kw) update of its kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .targets import Target


@dataclass
class LoRALayer:
    down: torch.Tensor  # A: (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # B: (out, rank) or (out, rank, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """ΔW = (alpha/rank)·B·A in `dtype`, shaped like the layer's weight."""
        up, down = self.up.to(dtype).flatten(1), self.down.to(dtype).flatten(1)
        return (up @ down * (self.alpha / self.rank)).reshape(shape)


@dataclass
class LoRA:
    """A set of adapted layers as a file holds them: {file key of the layer: LoRALayer}."""

    layers: dict[str, LoRALayer]
    layout: str  # "kohya" or "peft"
    metadata: dict[str, str] = field(default_factory=dict)
    name: str = "lora"
    hash: str = ""  # the web UI's short hash of the file (files.short_hash)


class LowRank(nn.Module):
    """Parametrization W -> W + Σ (alpha/rank)·B·A over the row blocks of W that its targets are.

    Training attaches it to a frozen weight with torch's parametrize, so every use of the weight (a
    fused QKV projection, GEGLU's chunked weight, CLIP's in_proj_weight) sees the adapted value and
    the network itself stays unchanged. A starts as Kaiming-uniform and B as zero, so ΔW starts at 0.
    """

    def __init__(self, targets: list[Target], rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.targets = sorted(targets, key=lambda t: t.rows)
        self.scale = alpha / rank
        self.alpha = alpha
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for t in self.targets:
            down = torch.empty(rank, *t.shape[1:])
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)  # as nn.Linear initialises, and kohya and peft
            self.down.append(nn.Parameter(down))
            self.up.append(nn.Parameter(torch.zeros(t.shape[0], rank, *([1, 1] if len(t.shape) == 4 else []))))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        blocks, row = [], 0
        for t, down, up in zip(self.targets, self.down, self.up):
            start, stop = t.rows
            if start > row:  # rows of a fused weight that no target adapts
                blocks.append(weight.new_zeros(start - row, *weight.shape[1:]))
            blocks.append((up.flatten(1) @ down.flatten(1)).reshape(stop - start, *weight.shape[1:]))
            row = stop
        if row < weight.shape[0]:
            blocks.append(weight.new_zeros(weight.shape[0] - row, *weight.shape[1:]))
        return weight + (torch.cat(blocks) * self.scale).to(weight.dtype)

    def layers(self) -> dict[Target, LoRALayer]:
        return {t: LoRALayer(d.detach().clone(), u.detach().clone(), self.alpha)
                for t, d, u in zip(self.targets, self.down, self.up)}


class Adapters(nn.Module):
    """The trainable adapters of a pipeline, attached to its weights; its state dict holds only A and B."""

    def __init__(self, pipe, targets: list[Target], rank: int, alpha: float, seed: int = 0):
        super().__init__()
        self.parts = nn.ModuleDict()
        generator = torch.Generator().manual_seed(seed)  # the same A whatever ran before in the process
        by_param: dict[tuple[str, str], list[Target]] = {}
        for t in targets:
            by_param.setdefault((t.component, t.param), []).append(t)
        for (component, param), group in by_param.items():
            model = getattr(pipe, component)
            module = model.get_submodule(group[0].module)
            low_rank = LowRank(group, rank, alpha, generator).to(getattr(module, group[0].param_name).device)
            parametrize.register_parametrization(module, group[0].param_name, low_rank)
            self.parts[f"{component}:{param}".replace(".", "/")] = low_rank

    def layers(self) -> dict[Target, LoRALayer]:
        return {t: layer for part in self.parts.values() for t, layer in part.layers().items()}

    def load_layers(self, layers: dict[Target, LoRALayer], what: str) -> None:
        """Copy A and B in from matched file layers (resume); every trained layer must be there."""
        from .files import LoRAError

        for part in self.parts.values():
            for t, down, up in zip(part.targets, part.down, part.up):
                if t not in layers:
                    raise LoRAError(f"{what}: no weights for layer {t.name}")
                with torch.no_grad():
                    down.copy_(layers[t].down.reshape(down.shape))
                    up.copy_(layers[t].up.reshape(up.shape))

    def components(self) -> set[str]:
        return {t.component for part in self.parts.values() for t in part.targets}
