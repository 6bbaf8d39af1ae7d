"""Softmax attention for fp32 CPU tensors with narrow heads, as a PyTorch op with its backward.

PyTorch's CPU flash-attention kernel runs a few small GEMM calls per block of 32 queries. With heads
8 or 16 wide, as in SD-style U-Nets of a few channels per head, those calls cost more than their
arithmetic. attention_cpu.cpp computes the same exact attention with the keys transposed, so that its
loops run along the keys in vector registers, four queries at a time. On a 2-core AMD EPYC a
(16, 8, 256, 8) self-attention (0.27 GFLOP) took 4.3 ms forward and 17 ms forward and backward,
against 12 and 52 ms through SDPA in the same run. torch.compile calls the op as it is.

The C++ source is built with the toolkit's other CPU kernels (diffusion.models.cpu_kernels). Where
that cannot happen, `available()` is False and the layers use F.scaled_dot_product_attention instead.
"""

from __future__ import annotations

import ctypes
import sys

import torch

from .cpu_kernels import available, library, loaded

__all__ = ["HEAD_DIMS", "applies", "attention", "available", "library", "register_flop_formulas"]

HEAD_DIMS = (8, 16, 24, 32)  # wider heads keep SDPA: its GEMMs are then large enough to run at full speed
HALF = (torch.bfloat16, torch.float16)


def applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether attention on these (B, N, H, D) tensors runs the kernel: fp32, bf16 or fp16 on the CPU,
    narrow heads.

    Inside a torch.compile trace nothing is built: the kernel runs there if `library()` has loaded
    it before, as building an Attention layer does.
    """
    if not (q.device.type == "cpu" and q.dtype == k.dtype and q.dtype in (torch.float32, *HALF)
            and q.shape[-1] in HEAD_DIMS):
        return False
    if torch.compiler.is_compiling():
        return loaded()
    return available()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself if its head dimension is contiguous (any other strides do), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> list[int]:
    return [t.stride(0), t.stride(1), t.stride(2)]


def _check(status: int) -> None:
    if status == 2:
        raise ValueError(f"the CPU attention kernel takes heads {HEAD_DIMS} wide")
    if status:
        raise MemoryError("the CPU attention kernel could not allocate its buffers")


# Defined through torch.library.Library rather than the custom_op decorator, which imports
# torch._dynamo (about 2 s) on the way: sampling must start without it.
_lib = torch.library.Library("diffusion", "FRAGMENT")  # cpu_norm adds to the same namespace
_lib.define("cpu_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)")
_lib.define("cpu_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale)"
            " -> (Tensor, Tensor, Tensor)")


def _kernels_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> ctypes.CDLL:
    """The library, for tensors it can take. The kernel reads raw fp32 memory: anything else must
    stop here, with what to use instead."""
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU attention kernel is not available here; use F.scaled_dot_product_attention")
    if any(t.dtype != torch.float32 for t in (q, k, v)):
        raise ValueError(f"the CPU attention kernel takes fp32 tensors, not {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or (q.shape[0], *q.shape[2:]) != (k.shape[0], *k.shape[2:]):
        raise ValueError(f"the CPU attention kernel takes q (B, N, H, D) and k, v (B, M, H, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return lib


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _kernels_for(q, k, v)
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, N, H, D = q.shape
    M = k.shape[1]
    out = torch.empty(B, N, H, D)
    lse = torch.empty(B, H, N)
    _check(lib.attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), B, H, N, M, D,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), scale, torch.get_num_threads()))
    return out, lse


def _backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dout, q, k, v, out = (_rows(t) for t in (dout, q, k, v, out))
    B, N, H, D = q.shape
    M = k.shape[1]
    dq, dk, dv = torch.empty(B, N, H, D), torch.empty(B, M, H, D), torch.empty(B, M, H, D)
    _check(library().attention_backward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), dout.data_ptr(), lse.contiguous().data_ptr(),
        dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), B, H, N, M, D,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(dout), scale, torch.get_num_threads()))
    return dq, dk, dv


_lib.impl("cpu_attention", _forward, "CPU")
_lib.impl("cpu_attention_backward", _backward, "CPU")


@torch.library.register_fake("diffusion::cpu_attention")
def _(q, k, v, scale):
    B, N, H, D = q.shape
    return q.new_empty(B, N, H, D), q.new_empty(B, H, N)


@torch.library.register_fake("diffusion::cpu_attention_backward")
def _(dout, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _grads(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.diffusion.cpu_attention_backward(dout, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


torch.library.register_autograd("diffusion::cpu_attention", _grads, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √D) v over heads: q (B, N, H, D), k and v (B, M, H, D) -> (B, N, H, D).

    Takes the heads in the token-major layout that a linear layer's output has, so that no head
    transpose is copied on the way in or out. bf16 and fp16 inputs (autocast) are computed in fp32
    and the result rounded back, as SDPA's CPU kernel accumulates them in fp32.
    """
    if q.dtype in HALF:
        return attention(q.float(), k.float(), v.float()).to(q.dtype)
    return torch.ops.diffusion.cpu_attention(q, k, v, q.shape[-1] ** -0.5)[0]


def register_flop_formulas() -> None:
    """Teach torch.utils.flop_counter these ops, with the counts it gives SDPA's kernels.

    Done on import where flop_counter is already loaded, and by callers that load it later: importing
    it here would add a third of a second to every start.
    """
    from torch.utils import flop_counter

    if torch.ops.diffusion.cpu_attention in flop_counter.flop_registry:
        return

    def heads_first(shape):  # (B, N, H, D) -> (B, H, N, D), the layout flop_counter's formulas take
        return (shape[0], shape[2], shape[1], shape[3])

    @flop_counter.register_flop_formula(torch.ops.diffusion.cpu_attention)
    def _(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(heads_first(q_shape), heads_first(k_shape), heads_first(v_shape))

    @flop_counter.register_flop_formula(torch.ops.diffusion.cpu_attention_backward)
    def _(dout_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(*(heads_first(s) for s in (dout_shape, q_shape, k_shape, v_shape)))


if "torch.utils.flop_counter" in sys.modules:
    register_flop_formulas()
