"""Shared fixtures: tiny seeded models, so that every test runs in seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def traced():
    """traced(fn) -> (compiled fn, graphs): a fullgraph torch.compile that keeps the FX graphs dynamo
    traces and runs them as traced, without inductor's minutes of kernel building."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def compile_traced(fn):
        torch._dynamo.reset()
        return torch.compile(fn, backend=backend, fullgraph=True), graphs

    return compile_traced


@pytest.fixture(scope="session")
def tiny_config():
    from diffusion.config import load_config

    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_config):
    """A randomly initialised (seeded) pipeline built from configs/tiny.yaml."""
    from diffusion.pipeline import Pipeline

    torch.manual_seed(0)
    cfg = tiny_config.pipeline_config(trained_on="nothing (random weights)", example_prompts=("a red circle in the center",))
    pipe = Pipeline(cfg)
    # Zero-initialised output layers would make every prediction 0; perturb them so samples vary.
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return pipe


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_pipeline, tmp_path_factory) -> Path:
    """The tiny pipeline saved as a model folder (read-only for tests: copy it before changing it)."""
    path = tmp_path_factory.mktemp("models") / "tiny"
    tiny_pipeline.save(path)
    return path
