"""Convolutions for CPU inference on weights reordered once for oneDNN, not at every call.

PyTorch's CPU convolution hands oneDNN the weight in PyTorch's layout, and oneDNN reorders it into
the blocked layout its kernel wants on every call: for a (256, 256, 3, 3) weight on a (8, 256, 4, 4)
map that takes longer than the convolution itself (1.6 ms against 0.7 ms with the weight reordered
beforehand, two threads). Here the reordered weight is kept beside the parameter, keyed by the
parameter's version counter, its memory and the input's shape, so it is rebuilt whenever an in-place
change (an optimizer step, load_state_dict, a merged LoRA), a cast or move (Module.to) or a new input
shape calls for it. Like autograd, it cannot see a change made in place through `.data`, which bypasses
the version counter. The result is the same oneDNN convolution, bit for bit (tests/test_cpu_conv.py).

It runs only where no gradient is recorded, for fp32 channels-last maps outside autocast: inference,
where the weights stay put. The check and the lookup run at every call, compiled or not, so a
compiled graph never sees a stale weight. Inference keeps one reordered copy of each such weight, for
the input shape it saw last.
"""

from __future__ import annotations

import sys
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


AVAILABLE = torch.backends.mkldnn.is_available()  # read once: torch.compile does not trace it


def aten_uses_onednn(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether F.conv2d itself calls oneDNN for this fp32 CPU map and a kernel wider than 1x1: ATen's rule
    (ConvParams::use_mkldnn in Convolution.cpp). Where it runs its own kernel instead (one small image),
    so does the layer, so that its bits never depend on this module."""
    return conv.groups > 1 or x.shape[0] > 1 or x.numel() > 20480 or (conv.kernel_size[0] > 3 and conv.kernel_size[1] > 3)


def applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether conv(x) runs on a reordered weight: no-grad fp32 inference of a channels-last CPU map."""
    if parametrize.is_parametrized(conv):  # its weight is a new tensor at every call
        return False
    weight = conv.weight
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() == 4
            and x.numel() > 0 and conv.kernel_size != (1, 1) and aten_uses_onednn(x, conv)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and not torch.is_autocast_enabled("cpu") and AVAILABLE
            and (torch.compiler.is_compiling() or torch.backends.mkldnn.enabled)
            and x.is_contiguous(memory_format=torch.channels_last))


def conv2d(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(x) through the op; (B, C, H, W) channels last -> the same."""
    return torch.ops.diffusion.conv2d(x, conv.weight, conv.bias, list(conv.stride), list(conv.padding),
                                      list(conv.dilation), conv.groups)


class Reordered(NamedTuple):
    key: tuple  # what the copy was made from: the weight's version and memory, and the call's shapes
    source: torch.Tensor  # the weight's memory at the time, held so that no other tensor can take its address
    weight: torch.Tensor  # the reordered copy


# id(weight) -> its Reordered, for the input shape it saw last; dropped when the weight is freed.
# In-place changes bump the version; `.data` swaps (Module.to) change the memory, whose address
# `source` keeps from being reused by the next one.
_reordered: dict[int, Reordered] = {}


def reordered_weight(weight: torch.Tensor, x: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
    """weight in the layout oneDNN's convolution of x wants, reordered once per version and input shape."""
    key = (weight._version, weight.data_ptr(), tuple(x.shape), tuple(stride), tuple(padding), tuple(dilation), groups)
    entry = _reordered.get(id(weight))
    if entry is None:
        weakref.finalize(weight, _reordered.pop, id(weight), None)
    elif entry.key == key:
        return entry.weight
    # Normal tensors even inside inference_mode, so that they may be used outside it later; and with no
    # autograd history, which would hold on to the weight and so keep it alive.
    with torch.inference_mode(False), torch.no_grad():
        source = weight.detach()
        packed = torch.ops.mkldnn._reorder_convolution_weight(source, padding, stride, dilation, groups, list(x.shape))
    _reordered[id(weight)] = Reordered(key, source, packed)
    return packed


def forget(weight: torch.Tensor) -> None:
    """Drop weight's reordered copy, if any."""
    _reordered.pop(id(weight), None)


_lib = torch.library.Library("diffusion", "FRAGMENT")
_lib.define("conv2d(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups)"
            " -> Tensor")


def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int],
            dilation: list[int], groups: int) -> torch.Tensor:
    if weight.is_inference():  # no version counter to key the reordered weight by
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    packed = reordered_weight(weight, x, stride, padding, dilation, groups)
    return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, stride, dilation, groups, "none", [], "")


_lib.impl("conv2d", _conv2d, "CPU")


@torch.library.register_fake("diffusion::conv2d")
def _(x, weight, bias, stride, padding, dilation, groups):
    return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)


def register_flop_formulas() -> None:
    """Teach torch.utils.flop_counter this op, with the count it gives aten's convolution.

    Done on import where flop_counter is already loaded, and by callers that load it later: importing
    it here would add a third of a second to every start.
    """
    from torch.utils import flop_counter

    if torch.ops.diffusion.conv2d in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(torch.ops.diffusion.conv2d)
    def _(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


if "torch.utils.flop_counter" in sys.modules:
    register_flop_formulas()
