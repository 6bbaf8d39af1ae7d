"""The CPU group norm kernel and its backward pass against float64 GroupNorm (and SiLU), and where the layers use it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusion.models import cpu_norm
from diffusion.models.layers import ResBlock, SpatialTransformer, group_norm

pytestmark = pytest.mark.skipif(not cpu_norm.available(), reason="no C++ compiler to build the kernel")


def channels_last_map(B, C, H, W, mean=0.0, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, H, W, generator=g) * std + mean).to(memory_format=torch.channels_last)


def affine_norm(C, G, eps=1e-6, seed=1):
    g = torch.Generator().manual_seed(seed)
    norm = nn.GroupNorm(G, C, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(C, generator=g))
        norm.bias.copy_(torch.randn(C, generator=g))
    return norm


def reference(x, norm, silu):
    y = F.group_norm(x.double(), norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
    return F.silu(y) if silu else y


# Group widths 1 to 40 (chunks of 8 to 64 channels), 1x1 to 64x64 maps, rows past one 128-row block,
# batch 1 to 3, and SD's widths (320 in 32 groups, 1280) beside ours.
SHAPES = [(2, 64, 16, 16, 32), (3, 192, 5, 7, 32), (1, 8, 1, 1, 4), (2, 24, 12, 12, 3), (1, 64, 64, 64, 32),
          (2, 320, 4, 4, 32), (1, 1280, 3, 3, 32), (2, 96, 9, 9, 24), (1, 16, 20, 20, 1)]


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("B, C, H, W, G", SHAPES)
def test_matches_float64_group_norm(B, C, H, W, G, silu):
    x, norm = channels_last_map(B, C, H, W), affine_norm(C, G)
    with torch.no_grad():
        assert cpu_norm.applies(x, norm)
        out = cpu_norm.group_norm(x, norm, silu)
        want = reference(x, norm, silu)
        torch_err = ((F.silu(norm(x)) if silu else norm(x)).double() - want).abs().max()
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    err = (out.double() - want).abs().max()
    assert err <= 4e-6 * want.abs().max(), (err, torch_err)


def test_keeps_its_precision_when_the_mean_is_large_against_the_spread():
    x, norm = channels_last_map(2, 64, 16, 16, mean=1000.0, std=0.01), affine_norm(64, 32)
    with torch.no_grad():
        err = (cpu_norm.group_norm(x, norm, silu=False).double() - reference(x, norm, False)).abs().max()
        torch_err = (norm(x).double() - reference(x, norm, False)).abs().max()
    # Outputs reach about 12 here. x * a + s rounds at x * a, about 1e5 * fp32's 6e-8; PyTorch's
    # kernel, which subtracts the squared mean from the mean square, is off by more than the outputs.
    assert err < 0.05 and torch_err > 1.0


def test_results_do_not_depend_on_the_batch_or_the_threads():
    x, norm = channels_last_map(4, 64, 16, 16), affine_norm(64, 32)
    threads = torch.get_num_threads()
    with torch.no_grad():
        whole = cpu_norm.group_norm(x, norm, silu=True)
        alone = cpu_norm.group_norm(x[2:3].contiguous(memory_format=torch.channels_last), norm, silu=True)
        torch.set_num_threads(1)
        try:
            one_thread = cpu_norm.group_norm(x, norm, silu=True)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(alone, whole[2:3]) and torch.equal(one_thread, whole)


def test_where_the_kernel_does_not_apply():
    x, norm = channels_last_map(2, 64, 4, 4), affine_norm(64, 32)
    assert cpu_norm.applies(x.clone().requires_grad_(), norm)  # training too: the op has its backward
    # Each beside the case that does apply.
    with torch.no_grad():
        assert cpu_norm.applies(x, norm)
        assert not cpu_norm.applies(x.contiguous(), norm)  # NCHW: the layers keep nn.GroupNorm
        assert not cpu_norm.applies(x.bfloat16(), norm)
        assert not cpu_norm.applies(x, nn.GroupNorm(32, 64, affine=False))
        assert cpu_norm.applies(channels_last_map(1, 40, 4, 4), affine_norm(40, 8))  # groups of 5: chunks of 40
        assert not cpu_norm.applies(channels_last_map(1, 72, 4, 4), affine_norm(72, 8))  # groups of 9: chunks of 72
        assert not cpu_norm.applies(channels_last_map(1, 12, 4, 4), affine_norm(12, 4))  # channels off the vectors of 8
        assert not cpu_norm.applies(channels_last_map(0, 64, 4, 4), norm)  # nothing to normalise
        with pytest.raises(ValueError, match="72 channels in 8 groups"):
            cpu_norm.group_norm(channels_last_map(1, 72, 4, 4), affine_norm(72, 8))
        with pytest.raises(ValueError, match="fp32"):
            cpu_norm.group_norm(x.double(), norm)
        empty = channels_last_map(2, 64, 0, 4)  # the op itself takes empty maps, as nn.GroupNorm does
        assert cpu_norm.group_norm(empty, norm).shape == empty.shape


def float64_grads(x, norm, silu, dy):
    """d(norm(x), then SiLU if silu)·dy by x, weight and bias, all in float64."""
    leaves = [t.detach().double().requires_grad_() for t in (x, norm.weight, norm.bias)]
    y = F.group_norm(leaves[0], norm.num_groups, leaves[1], leaves[2], norm.eps)
    return torch.autograd.grad(F.silu(y) if silu else y, leaves, dy.double())


def kernel_grads(x, norm, silu, dy):
    x = x.detach().clone().requires_grad_()
    return torch.autograd.grad(cpu_norm.group_norm(x, norm, silu), (x, norm.weight, norm.bias), dy)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("B, C, H, W, G", SHAPES)
def test_backward_matches_float64(B, C, H, W, G, silu):
    x, norm = channels_last_map(B, C, H, W, mean=0.5, std=2.0), affine_norm(C, G)
    dy = channels_last_map(B, C, H, W, seed=2)
    got, want = kernel_grads(x, norm, silu, dy), float64_grads(x, norm, silu, dy)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    # dx's own scale, dy * weight / std: in groups of two values (1x1 maps, 2 channels per group) the
    # exact dx is about 0, and both float64 and the kernel give rounding noise of this size.
    dx_scale = (dy.abs().max() * norm.weight.abs().max() / x.std()).item()
    for name, g, w in zip(("x", "weight", "bias"), got, want):
        assert g.shape == w.shape and g.dtype == torch.float32
        scale = max(w.abs().max().item(), dx_scale if name == "x" else 0.0)
        assert (g.double() - w).abs().max() <= 4e-6 * scale, name


def test_backward_keeps_its_precision_when_the_mean_is_large_against_the_spread():
    x, norm = channels_last_map(2, 64, 16, 16, mean=1000.0, std=0.01), affine_norm(64, 32)
    dy = channels_last_map(2, 64, 16, 16, seed=2)
    got, want = kernel_grads(x, norm, True, dy), float64_grads(x, norm, True, dy)
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() <= 1e-4 * w.abs().max()


def test_backward_does_not_depend_on_the_batch_or_the_threads():
    x, norm = channels_last_map(4, 64, 16, 16), affine_norm(64, 32)
    dy = channels_last_map(4, 64, 16, 16, seed=2)
    threads = torch.get_num_threads()
    whole = kernel_grads(x, norm, True, dy)
    torch.set_num_threads(1)
    try:
        one_thread = kernel_grads(x, norm, True, dy)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(whole, one_thread))
    x2, dy2 = (t[2:3].contiguous(memory_format=torch.channels_last) for t in (x, dy))
    alone = kernel_grads(x2, norm, True, dy2)
    assert torch.equal(alone[0], whole[0][2:3])


def test_training_a_block_through_the_kernel_gives_torch_gradients(monkeypatch):
    torch.manual_seed(0)
    block = ResBlock(64, 128, emb_ch=16, groups=32)
    x, emb = channels_last_map(2, 64, 8, 8), torch.randn(2, 16)

    def grads():
        x_ = x.clone().requires_grad_()
        block.zero_grad()
        block(x_, block.emb_proj(emb)).square().sum().backward()
        return [x_.grad] + [p.grad.clone() for p in block.parameters()]

    calls = []
    original = cpu_norm.group_norm
    monkeypatch.setattr(cpu_norm, "group_norm", lambda x, norm, silu=False: calls.append(silu) or original(x, norm, silu))
    fast = grads()
    assert calls == [True, True]
    monkeypatch.setattr(cpu_norm, "applies", lambda x, norm: False)
    plain = grads()
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_the_ops_pass_torch_library_checks():
    x, norm = channels_last_map(2, 64, 5, 5), affine_norm(64, 32)
    dy = channels_last_map(2, 64, 5, 5, seed=2)
    torch.library.opcheck(torch.ops.diffusion.group_norm.default, (x.requires_grad_(), norm.weight, norm.bias, 32, 1e-6, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.diffusion.group_norm_backward.default,
                          (dy, x.detach(), norm.weight.detach(), norm.bias.detach(), 32, 1e-6, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_layers_use_the_kernel_without_autograd_and_match_torch(monkeypatch):
    torch.manual_seed(0)
    block, transformer = ResBlock(64, 128, emb_ch=16, groups=32).eval(), SpatialTransformer(128, 8, 24, groups=32).eval()
    x, emb, context = channels_last_map(2, 64, 8, 8), block.emb_proj(torch.randn(2, 16)), torch.randn(2, 5, 24)
    calls = []
    original = cpu_norm.group_norm
    monkeypatch.setattr(cpu_norm, "group_norm", lambda x, norm, silu=False: calls.append(silu) or original(x, norm, silu))
    with torch.no_grad():
        fast = transformer(block(x, emb), context)
        assert calls == [True, True, False]  # the ResBlock's two norms with SiLU, the transformer's without
        monkeypatch.setattr(cpu_norm, "applies", lambda x, norm: False)
        plain = transformer(block(x, emb), context)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert len(calls) == 3


def test_compiled_layers_call_the_kernel_without_graph_breaks(traced):
    norm, x = affine_norm(64, 32), channels_last_map(2, 64, 6, 6)
    compiled, graphs = traced(lambda x: group_norm(norm, x, silu=True))
    with torch.no_grad():
        out = compiled(x)
        torch.testing.assert_close(out, F.silu(norm(x)), rtol=1e-5, atol=1e-5)
    assert any("group_norm" in str(node.target) and "diffusion" in str(node.target) for node in graphs[0].graph.nodes)
