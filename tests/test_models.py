"""Shapes and invariants of the VAE, text encoder and U-Net, on tiny seeded configs."""

import pytest
import torch

from diffusion.config import TextEncoderConfig, UNetConfig, VAEConfig
from diffusion.models.layers import conv1x1, layer_norm, linear_all, pointwise, timestep_embedding
from diffusion.models.text import TextEncoder
from diffusion.models.unet import UNet
from diffusion.models.vae import AutoencoderKL, DiagonalGaussian
from diffusion.io.weights import WeightsError, save_weights


def tiny_unet(**kw) -> UNet:
    base = dict(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1),
                num_heads=2, context_dim=24, norm_groups=8)
    torch.manual_seed(0)
    return UNet(UNetConfig(**{**base, **kw}))


# ----------------------------------------------------------------------------- VAE


@pytest.mark.parametrize("channel_mult, f", [((1, 2, 2), 4), ((1, 2, 2, 2), 8)])
@pytest.mark.parametrize("size", [(32, 32), (16, 48)])
def test_vae_factor_and_shapes(channel_mult, f, size):
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(channels=16, channel_mult=channel_mult, num_res_blocks=1, norm_groups=8, latent_channels=3))
    assert vae.factor == f
    x = torch.randn(3, 3, *size)
    posterior = vae.encode(x)
    assert posterior.mean.shape == (3, 3, size[0] // f, size[1] // f)
    assert vae.decode(posterior.sample()).shape == x.shape
    assert posterior.kl().shape == (3,)


def test_vae_rejects_sizes_off_the_factor():
    vae = AutoencoderKL(VAEConfig(channels=8, channel_mult=(1, 1, 1), num_res_blocks=1, norm_groups=4))
    with pytest.raises(ValueError, match="divisible by the VAE factor 4"):
        vae.encode(torch.randn(1, 3, 18, 16))


def test_vae_without_mid_attention():
    vae = AutoencoderKL(VAEConfig(channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4, mid_attention=False))
    assert vae.decode(vae.encode(torch.randn(1, 3, 8, 8)).mode()).shape == (1, 3, 8, 8)


def test_diagonal_gaussian_closed_forms():
    mean = torch.randn(2, 4, 3, 3)
    logvar = torch.randn(2, 4, 3, 3)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert torch.equal(post.mode(), mean)
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), expected)
    # KL of the standard normal is zero, and samples come from the right distribution.
    std_normal = DiagonalGaussian(torch.zeros(1, 8, 64, 64))
    assert std_normal.kl().abs().max() < 1e-6
    s = std_normal.sample(torch.Generator().manual_seed(0))
    assert abs(s.mean()) < 0.05 and abs(s.std() - 1) < 0.05
    # logvar is clamped, so exp() never overflows.
    assert torch.isfinite(DiagonalGaussian(torch.full((1, 2, 1, 1), 1e4)).std).all()


# ----------------------------------------------------------------------------- text encoder


def tiny_text(**kw) -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(TextEncoderConfig(**{**dict(width=32, layers=2, heads=4, context_length=12), **kw}))


def test_text_encoder_shapes_and_empty_prompt():
    te = tiny_text()
    tokens = te.tokenize(["a red circle", ""])
    assert tokens.shape == (2, 12)
    # Start and end tokens surround the empty prompt: it is a real, fixed unconditional input.
    assert tokens[1, 0] == te.tokenizer.sot_token_id and tokens[1, 1] == te.tokenizer.eot_token_id
    hidden, pooled = te(tokens)
    assert hidden.shape == (2, 12, 32) and pooled.shape == (2, 32)
    empty, again = te.encode(["", "a red circle"]), te.encode([""])
    torch.testing.assert_close(empty[:1], again)  # the same input gives the same states in any batch
    assert not torch.allclose(empty[0], empty[1])  # and a caption gives other states


def test_text_encoder_truncates_with_one_warning():
    te = tiny_text()
    long = " ".join(["word"] * 40)
    with pytest.warns(UserWarning, match="truncated"):
        tokens = te.tokenize([long, long])
    assert tokens[0, -1] == te.tokenizer.eot_token_id


def test_text_encoder_layers():
    last, penult = tiny_text(layer="last"), tiny_text(layer="penultimate")
    penult.load_state_dict(last.state_dict())
    tokens = last.tokenize(["a blue square"])
    h_last, p_last = last(tokens)
    h_pen, p_pen = penult(tokens)
    assert not torch.allclose(h_last, h_pen)
    torch.testing.assert_close(p_last, p_pen)  # the pooled embedding always comes from the last layer


def test_text_encoder_frozen_or_trainable():
    frozen, trainable = tiny_text(trainable=False), tiny_text(trainable=True)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in trainable.parameters())
    frozen.train()
    assert not frozen.training


def test_text_encoder_named_architecture():
    te = TextEncoder(TextEncoderConfig(arch="ViT-B-32"))
    assert te.width == 512 and te.context_length == 77
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        TextEncoder(TextEncoderConfig(arch="ViT-Nope"))


@pytest.mark.parametrize("layout", ["ours", "open_clip"])
def test_text_encoder_loads_local_weights(tmp_path, layout):
    src = tiny_text()
    state = src.state_dict()
    if layout == "open_clip":
        # A whole CLIP checkpoint: text tensors at the top level, beside the vision tower.
        state = {k[len("tower."):]: v for k, v in state.items()}
        state["visual.conv1.weight"] = torch.zeros(2, 2)
        state["logit_scale"] = torch.tensor(1.0)
        torch.save(state, tmp_path / "clip.pt")
        path = tmp_path / "clip.pt"
    else:
        save_weights(src, tmp_path / "text.safetensors")
        path = tmp_path / "text.safetensors"
    torch.manual_seed(123)
    loaded = TextEncoder(TextEncoderConfig(width=32, layers=2, heads=4, context_length=12, pretrained=str(path)))
    tokens = src.tokenize(["a green triangle"])
    torch.testing.assert_close(loaded(tokens)[0], src(tokens)[0])


def test_text_encoder_rejects_mismatched_weights(tmp_path):
    save_weights(tiny_text(), tmp_path / "text.safetensors")
    with pytest.raises(WeightsError, match="mis-shaped tensors"):
        TextEncoder(TextEncoderConfig(width=64, layers=2, heads=4, context_length=12, pretrained=str(tmp_path / "text.safetensors")))
    with pytest.raises(FileNotFoundError, match="neither a weights file"):
        TextEncoder(TextEncoderConfig(width=32, layers=2, heads=4, context_length=12, pretrained=str(tmp_path / "nope.safetensors")))


# ----------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("attention_levels, mid_attention", [((0, 1), True), ((), False), ((2,), True)])
@pytest.mark.parametrize("batch, h, w", [(1, 8, 8), (3, 8, 16), (5, 12, 4)])
def test_unet_shapes(attention_levels, mid_attention, batch, h, w):
    net = tiny_unet(attention_levels=attention_levels, mid_attention=mid_attention)
    x = torch.randn(batch, 4, h, w)
    out = net(x, torch.randint(0, 1000, (batch,)), torch.randn(batch, 7, 24))
    assert out.shape == x.shape


def test_unet_odd_latent_sizes():
    net = tiny_unet()
    x = torch.randn(2, 4, 9, 7)
    assert net(x, torch.tensor(3), torch.randn(2, 5, 24)).shape == x.shape


def test_unet_uses_time_and_text():
    net = tiny_unet()
    for p in net.parameters():  # undo the zero init of output layers, so outputs depend on inputs
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
    t = torch.tensor([10, 10])
    base = net(x, t, ctx)
    assert not torch.allclose(base, net(x, torch.tensor([900, 900]), ctx))
    assert not torch.allclose(base, net(x, t, torch.randn(2, 5, 24)))
    # Samples in a batch are independent.
    torch.testing.assert_close(net(x[:1], t[:1], ctx[:1]), base[:1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [{}, {"linear_projection": True}, {"num_heads": 1}])  # num_heads 1: 16- and 32-wide heads
def test_unet_prepared_context_gives_the_same_bits(kw, monkeypatch):
    """Keys and values projected once by prepare_context, as a sampler's steps share them, against
    the plain context; on the CPU kernel and on SDPA."""
    from diffusion.models import cpu_attention

    net = tiny_unet(**kw).eval()
    for p in net.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    x, t, ctx = torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 999]), torch.randn(3, 5, 24)
    prepared = net.prepare_context(ctx)
    assert [layer.kv_slot for layer in net.cross_attentions()] == list(range(7)) and len(prepared.kv) == 7  # 2 down, 1 middle, 4 up
    with torch.no_grad():
        assert torch.equal(net(x, t, net.prepare_context(ctx)), net(x, t, ctx))
        monkeypatch.setattr(cpu_attention, "applies", lambda q, k: False)
        assert torch.equal(net(x, t, net.prepare_context(ctx)), net(x, t, ctx))


def test_unet_gradient_checkpointing_matches():
    plain = tiny_unet()
    ckpt = tiny_unet(gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    for p in list(plain.parameters()) + list(ckpt.parameters()):
        if p.abs().sum() == 0:
            torch.nn.init.constant_(p, 0.01)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), torch.randn(2, 5, 24)
    plain.train(), ckpt.train()
    plain(x, t, ctx).square().mean().backward()
    ckpt(x, t, ctx).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_linear_all_is_each_layer_in_one_product():
    torch.manual_seed(0)
    layers, x = [torch.nn.Linear(24, n) for n in (8, 16, 4)], torch.randn(3, 5, 24)
    outs = linear_all(x, layers)
    assert [o.shape for o in outs] == [(3, 5, 8), (3, 5, 16), (3, 5, 4)]
    for out, layer in zip(outs, layers):
        torch.testing.assert_close(out, layer(x), atol=1e-6, rtol=1e-5)
    # Gradients reach each layer's own parameters, as from separate calls.
    sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
    grads = [(layer.weight.grad.clone(), layer.bias.grad.clone()) for layer in layers]
    for layer in layers:
        layer.zero_grad()
    sum((layer(x) * (i + 1)).sum() for i, layer in enumerate(layers)).backward()
    for (gw, gb), layer in zip(grads, layers):
        torch.testing.assert_close(gw, layer.weight.grad), torch.testing.assert_close(gb, layer.bias.grad)
    assert linear_all(x, []) == ()
    with pytest.raises(ValueError, match="all have biases or all have none"):
        linear_all(x, [torch.nn.Linear(24, 8), torch.nn.Linear(24, 8, bias=False)])


@pytest.mark.parametrize("channels_last", [True, False])
def test_conv1x1_and_pointwise_match_the_layers(channels_last):
    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(16, 24, 1), torch.randn(2, 16, 5, 7)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    out = conv1x1(conv, x)
    torch.testing.assert_close(out, conv(x), atol=1e-6, rtol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    tokens = x.permute(0, 2, 3, 1).reshape(2, 35, 16)  # (B, H*W, C)
    torch.testing.assert_close(pointwise(conv, tokens), conv(x).permute(0, 2, 3, 1).reshape(2, 35, 24), atol=1e-6, rtol=1e-5)
    linear = torch.nn.Linear(16, 24)
    torch.testing.assert_close(pointwise(linear, tokens), linear(tokens))


def test_unet_timestep_projections_are_each_resblocks():
    net = tiny_unet()
    t = torch.tensor([3, 700])
    emb = torch.nn.functional.silu(net.time_mlp(timestep_embedding(t, net.cfg.model_channels)))
    blocks = [*net.down, *net.mid, *net.up]
    projected = net.timestep_projections(t, torch.float32)
    assert len(projected) == len(blocks)
    for block, out in zip(blocks, projected):
        if block.res is None:
            assert out is None
        else:
            torch.testing.assert_close(out, block.res.emb_proj(emb), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_compiled_layer_norm_matches_the_layer(grad, traced):
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(64)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 50, 64) * 3 + 5
    compiled, graphs = traced(lambda x: layer_norm(norm, x))
    with torch.set_grad_enabled(grad):
        out = compiled(x)
    torch.testing.assert_close(out, norm(x), rtol=1e-5, atol=1e-5)
    # Inference runs the two plain means; training keeps F.layer_norm, whose compiled backward is faster.
    assert any("layer_norm" in str(node.target) for node in graphs[0].graph.nodes) == grad


def test_unet_rejects_bad_widths():
    with pytest.raises(ValueError, match="divisible by norm_groups"):
        tiny_unet(model_channels=12)
