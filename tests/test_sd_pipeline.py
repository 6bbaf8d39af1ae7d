"""Stable Diffusion models end to end: a tiny random pipeline with SD's real structure, built with diffusers
and transformers, saved as a diffusers folder and as a single file, generates the same pixels with
sample.py as with diffusers' StableDiffusionPipeline (SD 1.x and SD 2.x flavours; no downloads)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # builds and runs whole pipelines; the layouts have fast tests of their own

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
from diffusion.pipeline import load_pipeline  # noqa: E402
from sd_builders import FLAVOURS, SIZE, make_sd_model  # noqa: E402

PROMPT, SEED, STEPS, GUIDANCE = "a red circle in the top left", 3, 20, 7.5


@pytest.fixture(scope="module", params=list(FLAVOURS))
def sd_model(request, tmp_path_factory):
    """(flavour, diffusers folder, single file, the image diffusers draws as uint8 (H, W, 3))."""
    flavour, root = request.param, tmp_path_factory.mktemp(request.param)
    pipe = make_sd_model(flavour, root)
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
               generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    return flavour, root / "folder", root / "model.safetensors", (out * 255).round().astype(np.uint8)


def ours(model: Path, out: Path) -> np.ndarray:
    [path] = sample.generate_files(["--model", str(model), "--prompt", PROMPT, "--seed", str(SEED), "--steps", str(STEPS),
                                    "--guidance", str(GUIDANCE), "--height", str(SIZE), "--width", str(SIZE),
                                    "--sampler", "ddim", "--out", str(out), "--device", "cpu"])
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("form", ["folder", "single file"])
def test_sample_draws_the_pixels_diffusers_draws(sd_model, form, tmp_path):
    flavour, folder, single, theirs = sd_model
    mine = ours(folder if form == "folder" else single, tmp_path)
    diff = np.abs(mine.astype(int) - theirs.astype(int))
    assert theirs.std() > 10  # a real image, not a flat one that anything would match
    assert diff.max() <= 2, (flavour, form, diff.max(), (diff > 2).mean())


def test_the_folder_sets_the_schedule_tokenizer_and_pad(sd_model):
    flavour, folder, single, _ = sd_model
    pipe = load_pipeline(folder, device="cpu")
    te = pipe.text_encoder
    assert te.pad_id == (49407 if flavour == "sd1" else 0) and te.activation == FLAVOURS[flavour]["act"]
    assert (pipe.cfg.sampling.steps_offset, pipe.cfg.sampling.final_alpha_one, pipe.cfg.schedule.beta_schedule) == (1, False, "scaled_linear")
    from_file = load_pipeline(single, device="cpu")
    assert from_file.text_encoder.cfg.layer == ("last" if flavour == "sd1" else "penultimate")
    assert from_file.cfg.unet == dataclasses.replace(pipe.cfg.unet)
