"""The benchmark script runs, and speed work on the U-Net and VAE leaves their outputs unchanged.

The reference outputs in bench_reference.safetensors come from the un-optimised layers (commit
5e9bbd9). Regenerate them only for a deliberate change of results:
    UPDATE_BENCH_REFERENCE=1 python -m pytest tests/test_bench.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion.config import PipelineConfig, UNetConfig, VAEConfig, from_dict, load_yaml
from diffusion.models.unet import UNet
from diffusion.models.vae import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).with_name("bench_reference.safetensors")
TOL = 1e-5

# Two levels with attention at both (self and cross, 8-wide heads as in the benchmark), batch 2:
# every layer type is hit, on shapes small enough to keep the test quick.
UNET_CFG = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                      num_heads=2, context_dim=24, norm_groups=8)
VAE_CFG = VAEConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8, latent_channels=4)


def seeded_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Fill each tensor from a generator seeded by its state_dict key, so weights do not depend on
    the order modules are built in. No zeros either: zero-initialised output layers would hide bugs."""
    with torch.no_grad():
        for name, p in module.state_dict().items():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("weight") and p.ndim == 1:  # norm scales
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:  # biases
                p.copy_(0.1 * noise)
            else:  # fan-in scaling keeps activations O(1) through the network
                p.copy_(noise / p[0].numel() ** 0.5)
    return module


def unet_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    context = torch.randn(2, 7, UNET_CFG.context_dim, generator=g)
    return x, t, context


def compute_outputs() -> dict[str, torch.Tensor]:
    """Forward under no_grad, forward with grad in train mode, d(loss)/dx, and a VAE decode."""
    unet = seeded_weights(UNet(UNET_CFG)).eval()
    x, t, context = unet_inputs()
    with torch.no_grad():
        eps = unet(x, t, context)
    unet.train()
    x_req = x.clone().requires_grad_(True)
    eps_train = unet(x_req, t, context)
    eps_train.square().mean().backward()

    vae = seeded_weights(AutoencoderKL(VAE_CFG)).eval()
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image = vae.decode(z)
    return {"eps": eps, "eps_train": eps_train.detach(), "grad_x": x_req.grad, "vae_decode": image}


def test_outputs_match_unoptimised_reference():
    outputs = compute_outputs()
    if os.environ.get("UPDATE_BENCH_REFERENCE") == "1":
        save_file({k: v.contiguous() for k, v in outputs.items()}, str(REFERENCE))
        pytest.skip(f"wrote {REFERENCE.name}")
    reference = load_file(str(REFERENCE))
    for name, expected in reference.items():
        got = outputs[name]
        assert got.shape == expected.shape, name
        scale = expected.abs().max().item()
        err = (got - expected).abs().max().item()
        # 1e-5 relative to the tensor's magnitude: the gradient is small in absolute terms.
        assert err <= TOL * max(scale, 1.0), f"{name}: max |diff| {err:.2e} vs reference of magnitude {scale:.2e}"


def test_bench_config_matches_diffusers_parameter_count():
    """benchmarks/unet_bench.yaml's U-Net has the reference UNet2DConditionModel's 18,150,852 parameters."""
    cfg = from_dict(PipelineConfig, load_yaml(ROOT / "benchmarks" / "unet_bench.yaml"))
    assert sum(p.numel() for p in UNet(cfg.unet).parameters()) == 18_150_852


@pytest.mark.slow
def test_bench_quick_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_unet.py"), "--quick"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"train_ratio=\S+ sample_ratio=\S+ sample_bf16_ratio=\S+ generate_ratio=\S+", last), last


def test_short_workloads_get_rounds_until_the_time_adds_up():
    import time

    from benchmarks.measure import interleaved

    cpu = torch.device("cpu")
    nap = {"ours": lambda: time.sleep(0.005), "diffusers": lambda: time.sleep(0.005)}
    assert [len(v) for v in interleaved(nap, 3, 1, cpu).values()] == [3, 3]
    assert [len(v) for v in interleaved(nap, 3, 0, cpu, min_seconds=60.0, max_repeats=7).values()] == [7, 7]
    times = interleaved(nap, 2, 0, cpu, min_seconds=0.1, max_repeats=50)
    assert sum(map(sum, times.values())) >= 0.1 and 2 < len(times["ours"]) < 50
