"""CPU inference convolutions on reordered weights (diffusion.models.cpu_conv): the same bits as
F.conv2d, and never a stale weight, eager or compiled."""

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from diffusion.models import cpu_conv
from diffusion.models.layers import Conv2d

pytestmark = pytest.mark.skipif(not cpu_conv.AVAILABLE, reason="this PyTorch has no oneDNN")


def conv_and_map(c_in, c_out, size, batch=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    conv = Conv2d(c_in, c_out, 3, **kwargs).to(memory_format=torch.channels_last)
    x = torch.randn(batch, c_in, *size).to(memory_format=torch.channels_last)
    return conv, x


def reference(conv, x):
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def reordered(conv) -> bool:
    return id(conv.weight) in cpu_conv._reordered


# The U-Net's and the VAE's convolutions: 3 or 4 channels in, SD's widths, stride-2 downsamplers
# with LDM's unpadded form, odd sizes, one image and several, a bias or none.
SHAPES = [
    (4, 64, (16, 16), 8, dict(padding=1)), (64, 64, (16, 16), 8, dict(padding=1)), (256, 256, (4, 4), 8, dict(padding=1)),
    (384, 256, (8, 8), 2, dict(padding=1)), (3, 32, (97, 85), 1, dict(padding=1)), (64, 64, (16, 16), 2, dict(stride=2, padding=1)),
    (32, 32, (27, 27), 1, dict(stride=2, padding=0)), (320, 320, (9, 9), 1, dict(padding=1, bias=False)),
    (64, 4, (8, 8), 3, dict(padding=1)), (16, 32, (9, 9), 2, dict(padding=2, dilation=2, groups=4)),
]


@pytest.mark.parametrize("c_in, c_out, size, batch, kwargs", SHAPES)
def test_gives_f_conv2d_bits(c_in, c_out, size, batch, kwargs):
    conv, x = conv_and_map(c_in, c_out, size, batch, **kwargs)
    with torch.no_grad():
        assert cpu_conv.applies(x, conv)
        out = conv(x)
        assert reordered(conv)
        assert torch.equal(out, reference(conv, x)) and out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(conv(x), out)  # and again from the kept weight


def test_one_small_image_runs_atens_own_kernel_as_f_conv2d_does():
    conv, x = conv_and_map(32, 32, (17, 17), batch=1, stride=2)  # 9,248 values: ATen skips oneDNN below 20,480
    with torch.no_grad():
        assert not cpu_conv.applies(x, conv)
        assert torch.equal(conv(x), reference(conv, x)) and not reordered(conv)
        assert cpu_conv.applies(torch.cat([x, x]), conv)


def test_in_place_changes_and_new_shapes_reorder_again():
    conv, x = conv_and_map(64, 64, (8, 8), padding=1)
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(-0.5)  # an optimizer step or a merged LoRA changes the weight in place
        assert torch.equal(conv(x), reference(conv, x))
        conv.load_state_dict({"weight": torch.randn_like(conv.weight), "bias": conv.bias.clone()})
        assert torch.equal(conv(x), reference(conv, x))
        bigger = torch.randn(3, 64, 12, 10).to(memory_format=torch.channels_last)
        assert torch.equal(conv(bigger), reference(conv, bigger))
        conv.to(torch.bfloat16).float()  # the same parameter objects and versions, rounded weights
        assert torch.equal(conv(x), reference(conv, x))
        conv.weight.data = torch.randn_like(conv.weight)  # new memory, the same version
        assert torch.equal(conv(x), reference(conv, x))
    with torch.inference_mode():  # generate() runs in inference mode; the weights stay normal tensors
        conv.weight.add_(1.0)
        assert torch.equal(conv(x), reference(conv, x))
    kept = cpu_conv._reordered[id(conv.weight)]
    assert not kept.weight.is_inference() and kept.weight.grad_fn is None and not kept.source.is_inference()


def test_a_freed_weight_leaves_nothing_behind():
    conv, x = conv_and_map(32, 32, (8, 8), padding=1)
    with torch.no_grad():
        conv(x)
    key = id(conv.weight)
    assert key in cpu_conv._reordered
    del conv
    gc.collect()
    assert key not in cpu_conv._reordered


def test_compiled_graphs_call_it_and_see_changed_weights(traced):
    conv, x = conv_and_map(64, 64, (8, 8), padding=1)
    step, graphs = traced(lambda x: conv(x).relu())
    with torch.no_grad():
        assert torch.equal(step(x), reference(conv, x).relu())
        conv.weight.mul_(-1.0)
        assert torch.equal(step(x), reference(conv, x).relu())
    assert len(graphs) == 1
    assert any("diffusion.conv2d" in str(node.target) for node in graphs[0].graph.nodes)


def test_where_it_does_not_apply_the_layer_runs_as_nn_conv2d():
    conv, x = conv_and_map(16, 16, (6, 6), padding=1)
    grad_x = x.detach().clone().requires_grad_()
    assert not cpu_conv.applies(x, conv)  # training: autograd records the weight
    assert not cpu_conv.applies(x.contiguous(), conv) and not cpu_conv.applies(x.double(), conv)
    with torch.no_grad():
        assert not cpu_conv.applies(x.contiguous(), conv)  # NCHW
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu_conv.applies(x, conv)
    with torch.no_grad():
        assert cpu_conv.applies(x, conv)
    out = conv(grad_x)  # gradients still flow through the layer
    out.sum().backward()
    assert grad_x.grad is not None and conv.weight.grad is not None and not reordered(conv)

    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(conv, "weight", Scale())  # LoRA training's form: a new weight each call
    with torch.no_grad():
        assert not cpu_conv.applies(x, conv)
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_weights_made_in_inference_mode_fall_back():
    with torch.inference_mode():
        conv, x = conv_and_map(16, 16, (6, 6), padding=1)
        assert torch.equal(conv(x), reference(conv, x))
    assert not reordered(conv)


def test_the_op_passes_opcheck():
    conv, x = conv_and_map(8, 16, (5, 5), padding=1)
    with torch.no_grad():
        torch.library.opcheck(torch.ops.diffusion.conv2d.default,
                              (x, conv.weight.detach(), conv.bias.detach(), [1, 1], [1, 1], [1, 1], 1),
                              test_utils=("test_schema", "test_faketensor"))
