"""The CPU attention kernel against exact attention in float64, and the ways it is chosen or not."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from diffusion.models import cpu_attention
from diffusion.models.layers import Attention

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C++ compiler to build the kernel")


def reference(q, k, v):
    """softmax(q kᵀ/√D) v in float64 on (B, N, H, D) tensors."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (p @ v).transpose(1, 2)


def inputs(B, N, M, H, D, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, N, H, D, generator=g) * scale).requires_grad_()
    k = (torch.randn(B, M, H, D, generator=g) * scale).requires_grad_()
    v = torch.randn(B, M, H, D, generator=g).requires_grad_()
    return q, k, v


# Query counts off the kernel's blocks of four rows, key counts off its vectors of eight, every head width.
SHAPES = [(2, 5, 3, 2, 8), (1, 37, 77, 3, 16), (2, 16, 16, 4, 24), (1, 9, 77, 2, 32), (3, 64, 64, 8, 8)]


@pytest.mark.parametrize("B,N,M,H,D", SHAPES)
def test_forward_and_gradients_match_exact_attention(B, N, M, H, D):
    q, k, v = inputs(B, N, M, H, D)
    out = cpu_attention.attention(q, k, v)
    ref = reference(q, k, v)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.double())
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_peaked_softmax_underflows_to_exact_zeros_not_nans():
    # Scores spread over hundreds: most probabilities are far below 2^-127 = exp(-88), the kernel's cut-off.
    q, k, v = inputs(2, 12, 40, 2, 8, scale=12.0)
    out = cpu_attention.attention(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference(q, k, v), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_strided_views_give_what_contiguous_copies_give():
    # The layer hands over q, k, v as views into one fused projection, (B, N, 3, H, D) wide.
    qkv = torch.randn(2, 20, 3 * 4 * 8)
    q, k, v = (t.unflatten(-1, (4, 8)) for t in qkv.chunk(3, dim=-1))
    assert not q.is_contiguous()
    out = cpu_attention.attention(q, k, v)
    assert torch.equal(out, cpu_attention.attention(q.contiguous(), k.contiguous(), v.contiguous()))


def test_results_do_not_depend_on_the_thread_count():
    q, k, v = inputs(2, 33, 50, 4, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_attention.attention(q, k, v)
        one_grads = torch.autograd.grad(one.sum(), (q, k, v))
        torch.set_num_threads(2)
        two = cpu_attention.attention(q, k, v)
        two_grads = torch.autograd.grad(two.sum(), (q, k, v))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert all(torch.equal(a, b) for a, b in zip(one_grads, two_grads))


def test_the_op_passes_torch_library_checks():
    q, k, v = inputs(2, 6, 10, 2, 8)
    torch.library.opcheck(torch.ops.diffusion.cpu_attention.default, (q, k, v, 8 ** -0.5))


@pytest.mark.parametrize("D", [8, 16, 32])
def test_attention_layer_uses_the_kernel_where_it_applies_and_matches_sdpa(D):
    torch.manual_seed(0)
    layer = Attention(4 * D, heads=4)
    x = torch.randn(2, 30, 4 * D)
    q, k, v = (t.unflatten(-1, (4, D)) for t in layer.to_qkv(x).chunk(3, dim=-1))
    assert cpu_attention.applies(q, k)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    expected = layer.to_out(sdpa.transpose(1, 2).flatten(2))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_fp32_and_rounded_back(dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in inputs(2, 37, 77, 2, 8))
    assert cpu_attention.applies(q, k)
    out = cpu_attention.attention(q, k, v)
    assert out.dtype == dtype
    # Exact attention of the rounded inputs, rounded once: as close as the output format allows.
    torch.testing.assert_close(out, reference(q, k, v).to(dtype), rtol=0, atol=torch.finfo(dtype).eps)
    out.float().sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_attention_layer_under_bf16_autocast_runs_the_kernel(monkeypatch):
    torch.manual_seed(0)
    layer = Attention(64, heads=8, context_dim=16)
    x, context = torch.randn(2, 30, 64), torch.randn(2, 7, 16)
    calls = []
    original = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a: calls.append(a[0].dtype) or original(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, context)
    assert calls == [torch.bfloat16, torch.float32] and out.dtype == torch.bfloat16  # bf16 in, fp32 inside
    torch.testing.assert_close(out.float(), layer(x, context), rtol=0.05, atol=0.02)


def test_where_the_kernel_does_not_apply():
    q = torch.randn(1, 4, 2, 8)
    assert not cpu_attention.applies(q.double(), q.double())
    assert not cpu_attention.applies(q.bfloat16(), q)  # mixed dtypes
    wide = torch.randn(1, 4, 2, 64)
    assert not cpu_attention.applies(wide, wide)  # SD's 40-160-wide heads keep SDPA
    odd = torch.randn(1, 4, 2, 12)
    assert not cpu_attention.applies(odd, odd)
    with pytest.raises(ValueError, match="heads"):
        cpu_attention.attention(odd, odd, odd)
    with pytest.raises(ValueError, match="fp32"):
        cpu_attention.attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match=r"\(B, N, H, D\)"):
        cpu_attention.attention(q, q[:, :, :1], q)


def test_compiled_layer_calls_the_kernel_without_graph_breaks(traced):
    torch.manual_seed(0)
    layer = Attention(32, heads=4, context_dim=16)
    x, context = torch.randn(2, 9, 32), torch.randn(2, 5, 16)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, context), layer(x, context))
    compiled, graphs = traced(layer)
    compiled(x, context)
    assert any("cpu_attention" in str(node.target) for node in graphs[0].graph.nodes)


def test_flop_counter_counts_the_kernel_as_it_counts_sdpa():
    from torch.utils.flop_counter import FlopCounterMode

    cpu_attention.register_flop_formulas()
    B, N, M, H, D = 2, 16, 24, 4, 8
    q, k, v = inputs(B, N, M, H, D)
    with FlopCounterMode(display=False) as counter:
        cpu_attention.attention(q, k, v).sum().backward()
    forward = 2 * (2 * B * H * N * M * D)  # q kᵀ and p v
    backward = 5 * (2 * B * H * N * M * D)  # q kᵀ again, dO vᵀ, pᵀ dO, dS k, dSᵀ q
    assert counter.get_total_flops() == forward + backward


def run_child(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


CHILD = ("import logging, torch; logging.basicConfig(level=logging.INFO);"
         "from diffusion.models import cpu_attention as c;"
         "from diffusion.models.layers import Attention;"
         "q = torch.randn(1, 4, 2, 8); print('applies', c.applies(q, q)); print(Attention(16, 2)(torch.randn(1, 3, 16)).shape)")


def test_switched_off_by_environment_falls_back_to_sdpa():
    result = run_child(CHILD, DIFFUSION_CPU_KERNELS="0")
    assert result.returncode == 0, result.stderr
    assert "applies False" in result.stdout and "torch.Size([1, 3, 16])" in result.stdout


def test_a_compiler_that_fails_gives_one_warning_and_sdpa(tmp_path):
    result = run_child(CHILD, CXX="false", DIFFUSION_KERNEL_CACHE=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "applies False" in result.stdout
    assert result.stderr.count("CPU kernels did not build") == 1
    assert not list(tmp_path.glob("*.so"))


def test_built_once_per_cache_and_reused(tmp_path):
    code = "from diffusion.models import cpu_attention as c; print(c.library() is not None)"
    assert run_child(code, DIFFUSION_KERNEL_CACHE=str(tmp_path)).stdout.strip() == "True"
    (lib,) = tmp_path.glob("cpu_kernels-*.so")
    stamp = lib.stat().st_mtime_ns
    assert run_child(code, DIFFUSION_KERNEL_CACHE=str(tmp_path)).stdout.strip() == "True"
    assert lib.stat().st_mtime_ns == stamp and len(list(tmp_path.iterdir())) == 1
