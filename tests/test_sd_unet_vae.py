"""Stable Diffusion U-Net and VAE weights in and out (diffusion/io/sd_unet.py, sd_vae.py), against diffusers.

Tiny randomly initialised diffusers models with SD's real structure, shrunk in width: 4 levels,
attention at the first three, 2 ResBlocks per level. The SD 1.x flavour has 8 heads at every level
and conv projections; the SD 2.x flavour has heads of a fixed width (8 channels here, 64 in SD)
and linear projections. diffusers' own single-file converter is the independent check of the
original (CompVis) layout. Full-size SD U-Nets and VAE are built on the meta device only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from diffusion.config import UNetConfig, VAEConfig, load_config
from diffusion.io.sd_unet import (
    Family,
    unet_config_from_compvis,
    unet_config_from_diffusers,
    unet_from_compvis,
    unet_from_diffusers,
    unet_to_compvis,
    unet_to_diffusers,
)
from diffusion.io.sd_vae import (
    vae_config_from_compvis,
    vae_config_from_diffusers,
    vae_from_compvis,
    vae_from_diffusers,
    vae_to_compvis,
    vae_to_diffusers,
)
from diffusion.io.weights import WeightsError
from diffusion.models.unet import UNet
from diffusion.models.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-5
WIDTHS = (32, 64, 64, 64)
GROUPS = 8
CONTEXT_DIM = 16
DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
# diffusers' `attention_head_dim` is a number of heads per level (a naming it keeps for SD 2.x configs).
FLAVOURS = {
    "sd1": ({"attention_head_dim": 8, "use_linear_projection": False}, Family(num_heads=8, norm_groups=GROUPS)),
    "sd2": ({"attention_head_dim": tuple(w // 8 for w in WIDTHS), "use_linear_projection": True},
            Family(head_dim=8, norm_groups=GROUPS)),
}
SD15_UNET = {"block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
             "layers_per_block": 2, "norm_num_groups": 32, "down_block_types": DOWN, "up_block_types": UP}
SD21_UNET = {**SD15_UNET, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True}
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32,
          "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random, none zero (zero-initialised layers would hide mapping mistakes), activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return module.eval()


@pytest.fixture(scope="module", params=list(FLAVOURS))
def sd_unet(request):
    """(flavour name, diffusers U-Net, family)."""
    kwargs, family = FLAVOURS[request.param]
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(sample_size=16, block_out_channels=WIDTHS, layers_per_block=2,
                                           cross_attention_dim=CONTEXT_DIM, norm_num_groups=GROUPS,
                                           down_block_types=DOWN, up_block_types=UP, **kwargs)
    return request.param, randomise(model, seed=1), family


@pytest.fixture(scope="module")
def sd_vae():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(block_out_channels=WIDTHS, layers_per_block=2, latent_channels=4, norm_num_groups=GROUPS,
                                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return randomise(model, seed=2)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k, tensor in a.items():
        assert tensor.dtype == b[k].dtype and torch.equal(tensor, b[k]), k


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(max |difference|, max |difference| / max |theirs|)."""
    diff = (ours - theirs).abs().max().item()
    return diff, diff / theirs.abs().max().item()


# ----------------------------------------------------------------------------- (b) architecture from shapes


def test_unet_architecture_read_from_shapes(sd_unet):
    flavour, model, family = sd_unet
    cfg = unet_config_from_diffusers(model.state_dict(), family)
    assert cfg == UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(0, 1, 2),
                             num_heads=family.num_heads, head_dim=family.head_dim, linear_projection=flavour == "sd2",
                             context_dim=CONTEXT_DIM, norm_groups=GROUPS, norm_eps=1e-5)
    assert unet_config_from_compvis(unet_to_compvis(unet_from_diffusers(model.state_dict(), cfg), cfg), family) == cfg
    # The heads the family gives are the heads diffusers built.
    for name, module in model.named_modules():
        if name.endswith("attn1"):
            assert module.heads == cfg.heads_at(module.to_q.weight.shape[0]), name


def test_vae_architecture_read_from_shapes(sd_vae):
    cfg = vae_config_from_diffusers(sd_vae.state_dict(), norm_groups=GROUPS)
    assert cfg == VAEConfig(channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=2, norm_groups=GROUPS)
    assert vae_config_from_compvis(vae_to_compvis(vae_from_diffusers(sd_vae.state_dict(), cfg), cfg), GROUPS) == cfg


# ----------------------------------------------------------------------------- (a) round trips, diffusers' converter as oracle


def test_unet_round_trips_are_exact(sd_unet):
    _, model, family = sd_unet
    theirs = model.state_dict()
    cfg = unet_config_from_diffusers(theirs, family)
    native = unet_from_diffusers(theirs, cfg)
    assert_same_tensors(unet_to_diffusers(native, cfg), theirs)
    compvis = unet_to_compvis(native, cfg)
    assert_same_tensors(unet_to_compvis(unet_from_compvis(compvis, cfg), cfg), compvis)
    # diffusers reads our CompVis export back into exactly the model it started from.
    converted = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in compvis.items()}, dict(model.config))
    assert_same_tensors(converted, theirs)


def test_vae_round_trips_are_exact(sd_vae):
    theirs = sd_vae.state_dict()
    cfg = vae_config_from_diffusers(theirs, norm_groups=GROUPS)
    native = vae_from_diffusers(theirs, cfg)
    assert_same_tensors(vae_to_diffusers(native, cfg), theirs)
    compvis = vae_to_compvis(native, cfg)
    assert_same_tensors(vae_to_compvis(vae_from_compvis(compvis, cfg), cfg), compvis)
    # SD's original VAE keeps its mid-attention projections as 1x1 convs.
    assert compvis["decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert compvis["encoder.mid.attn_1.proj_out.bias"].shape == (64,)
    converted = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in compvis.items()}, dict(sd_vae.config))
    assert_same_tensors(converted, theirs)


# ----------------------------------------------------------------------------- (c) forward parity in fp32


def test_unet_forward_matches_diffusers(sd_unet):
    _, model, family = sd_unet
    cfg = unet_config_from_diffusers(model.state_dict(), family)
    ours = UNet(cfg).eval()
    ours.load_state_dict(unet_from_compvis(unet_to_compvis(unet_from_diffusers(model.state_dict(), cfg), cfg), cfg))
    assert ours.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900]), torch.randn(2, 5, CONTEXT_DIM, generator=g)
    with torch.no_grad():
        eps, expected = ours(x, t, context), model(x, t, encoder_hidden_states=context).sample
    assert rel_err(eps, expected)[1] < REL_TOL


def test_vae_encode_decode_match_diffusers(sd_vae):
    cfg = vae_config_from_diffusers(sd_vae.state_dict(), norm_groups=GROUPS)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_from_compvis(vae_to_compvis(vae_from_diffusers(sd_vae.state_dict(), cfg), cfg), cfg))
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    with torch.no_grad():
        posterior, expected = ours.encode(x), sd_vae.encode(x).latent_dist
        image, expected_image = ours.decode(z), sd_vae.decode(z).sample
    assert rel_err(posterior.mean, expected.mean)[1] < REL_TOL
    assert rel_err(posterior.logvar, expected.logvar)[1] < REL_TOL
    assert rel_err(image, expected_image)[1] < REL_TOL


@pytest.mark.slow
def test_native_export_loads_into_diffusers(sd_unet):
    """Weights trained here, exported, give diffusers the same function."""
    _, model, family = sd_unet
    cfg = unet_config_from_diffusers(model.state_dict(), family)
    ours = randomise(UNet(cfg), seed=3)
    theirs = type(model).from_config(model.config).eval()
    theirs.load_state_dict(unet_to_diffusers(ours.state_dict(), cfg))
    g = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 3, CONTEXT_DIM, generator=g)
    with torch.no_grad():
        assert rel_err(ours(x, t, context), theirs(x, t, encoder_hidden_states=context).sample)[1] < REL_TOL


# ----------------------------------------------------------------------------- (d) full size, on the meta device


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def assert_shapes_agree(mapped: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    expected = model.state_dict()
    assert sorted(mapped) == sorted(expected)
    assert all(mapped[k].shape == expected[k].shape for k in expected)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs, family, params", [(SD15_UNET, "sd1", 859_520_964), (SD21_UNET, "sd2", 865_910_724)])
def test_full_size_unet_maps_on_meta(kwargs, family, params):
    sd15 = load_config(ROOT / "configs" / "sd15.yaml").unet
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**kwargs)
        state = theirs.state_dict()
        cfg = unet_config_from_diffusers(state, family)
        ours = UNet(cfg)
    if family == "sd1":
        assert dataclasses.replace(cfg, gradient_checkpointing=sd15.gradient_checkpointing) == sd15
    assert param_count(theirs) == param_count(ours) == params
    native = unet_from_diffusers(state, cfg)
    assert_shapes_agree(native, ours)
    compvis = unet_to_compvis(native, cfg)
    assert len(compvis) == len(state) == 686 and unet_config_from_compvis(compvis, family) == cfg
    assert_shapes_agree(unet_from_compvis(compvis, cfg), ours)


def test_full_size_vae_maps_on_meta():
    sd15 = load_config(ROOT / "configs" / "sd15.yaml").vae
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(**SD_VAE)
        state = theirs.state_dict()
        ours = AutoencoderKL(sd15)
    assert vae_config_from_diffusers(state) == sd15
    assert param_count(theirs) == param_count(ours) == 83_653_863
    native = vae_from_diffusers(state, sd15)
    assert_shapes_agree(native, ours)
    assert_shapes_agree(vae_from_compvis(vae_to_compvis(native, sd15), sd15), ours)


# ----------------------------------------------------------------------------- (e) errors


def one_line_error(fn, *args) -> str:
    with pytest.raises(WeightsError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_mapping_errors_name_the_tensor(sd_unet, sd_vae):
    _, model, family = sd_unet
    state = model.state_dict()
    cfg = unet_config_from_diffusers(state, family)
    wrong = {**state, "down_blocks.1.resnets.0.conv1.weight": torch.zeros(64, 32, 1, 1)}
    assert "down_blocks.1.resnets.0.conv1.weight has shape (64, 32, 1, 1)" in one_line_error(unet_from_diffusers, wrong, cfg)
    assert "unexpected tensor lora.weight" in one_line_error(unet_from_diffusers, {**state, "lora.weight": torch.zeros(1)}, cfg)
    missing = {k: v for k, v in state.items() if k != "mid_block.attentions.0.proj_out.bias"}
    assert "missing tensor mid_block.attentions.0.proj_out.bias" in one_line_error(unet_from_diffusers, missing, cfg)
    native = unet_from_diffusers(state, cfg)
    assert "unexpected tensor ema.step" in one_line_error(unet_to_compvis, {**native, "ema.step": torch.zeros(())}, cfg)
    vae_cfg = vae_config_from_diffusers(sd_vae.state_dict(), norm_groups=GROUPS)
    compvis = vae_to_compvis(vae_from_diffusers(sd_vae.state_dict(), vae_cfg), vae_cfg)
    wrong_vae = {**compvis, "encoder.mid.attn_1.q.weight": torch.zeros(64, 64)}
    assert "encoder.mid.attn_1.q.weight has shape (64, 64)" in one_line_error(vae_from_compvis, wrong_vae, vae_cfg)
    assert "unknown model family 'sd3'" in one_line_error(unet_config_from_diffusers, state, "sd3")
