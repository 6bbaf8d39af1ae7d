"""Fine-tuning a pretrained Stable Diffusion model on a folder (configs/finetune.yaml), as a user runs it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusion.data import generate_shapes  # noqa: E402
from diffusion.io import sd_text  # noqa: E402
from diffusion.models.text import TextEncoder  # noqa: E402
from diffusion.config import TextEncoderConfig  # noqa: E402
from diffusion.pipeline import load_pipeline  # noqa: E402
from sd_builders import FLAVOURS, build_diffusers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module", params=["sd1", "sd2-v"])
def base(request, tmp_path_factory):
    """A tiny SD diffusers folder; sd2-v predicts v, as SD 2.x 768 models do."""
    flavour = request.param.split("-")[0]
    root = tmp_path_factory.mktemp(request.param)
    vocab = sd_text.tokenizer_files(TextEncoder(TextEncoderConfig(width=32, layers=1, heads=4)))
    sd_text.write_tokenizer(dataclasses.replace(vocab, pad=FLAVOURS[flavour]["pad"]), root / "vocab", 77)
    torch.manual_seed(0)
    pipe = build_diffusers(flavour, root / "vocab")
    if request.param.endswith("-v"):
        pipe.scheduler.register_to_config(prediction_type="v_prediction")
    pipe.save_pretrained(root / "folder", safe_serialization=True)
    return request.param, root / "folder"


@pytest.mark.slow
def test_finetune_trains_the_unet_of_a_pretrained_model_and_keeps_its_schedule(base, tmp_path):
    name, folder = base
    data, out = tmp_path / "data", tmp_path / "run"
    generate_shapes(data, num=8, size=64)
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "finetune.yaml"),
           f"model.pretrained={folder}", f"data.path={data}", f"output_dir={out}", "data.resolution=64",
           "training.max_steps=3", "training.batch_size=2", "training.grad_accum=1", "training.mixed_precision=no",
           "training.checkpoint_every=2", "unet.gradient_checkpointing=false", "training.validation_prompts=[a red circle]"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping the VAE stage: using {folder}" in proc.stderr and not (out / "vae").exists()

    before, after = load_pipeline(folder, device="cpu"), load_pipeline(out / "model", device="cpu")
    assert after.cfg.schedule == before.cfg.schedule  # the model's training schedule and prediction type
    assert after.cfg.schedule.prediction_type == ("v_prediction" if name.endswith("-v") else "epsilon")
    for frozen in ("vae", "text_encoder"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(before, frozen).state_dict().values(),
                                                     getattr(after, frozen).state_dict().values()))
    changed = [not torch.equal(a, b) for a, b in zip(before.unet.state_dict().values(), after.unet.state_dict().values())]
    assert any(changed)
    assert after.text_encoder.pad_id == before.text_encoder.pad_id and (out / "model" / "tokenizer").is_dir()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000002", "step-000003"]
