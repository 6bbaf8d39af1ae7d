"""The quick start, scaled down: the shapes pipeline at 16x16 follows color and position prompts, and a
LoRA adapter trained on it then draws a color that the model never saw, as its VAE renders that color.

The full bar (configs/shapes.yaml: 15 minutes, color and position >= 95% on seeds 0-4) is a
benchmark, run by hand and reported in the README and docs/quickstart.md. This test runs the same two
commands, train.py on configs/shapes.yaml and `python -m diffusion.eval shapes`, on a smaller data
set, a smaller image size and a few hundred steps, on a seed that the config was not tuned on, and
asserts that color and position both beat chance clearly.
"""

import pytest
import json
import os
import subprocess
import sys

from conftest import ROOT

COLOR_CHANCE, POSITION_CHANCE = 1 / 6, 1 / 5  # six colors, five positions
SEED = 3  # configs/shapes.yaml was tuned on seed 0
STEPS, EVAL_EVERY = 300, 100

# configs/shapes.yaml, scaled down: 16x16 images (4x4 latents), 512 of them, short stages. At this
# size a step costs little more at batch 128 than at 32, so fewer, larger steps at a higher rate
# learn the most per second (docs/quickstart.md has the runs).
SCALED_DOWN = [
    f"seed={SEED}", f"data.shapes.seed={SEED}", "data.resolution=16", "data.shapes.num=512",
    "vae_training.max_steps=600", "vae_training.warmup_steps=20", "vae_training.scale_samples=128",
    "vae_training.checkpoint_every=1000",
    f"training.max_steps={STEPS}", "training.batch_size=128", "training.lr=4e-3", "training.warmup_steps=50",
    "training.text_encoder_lr=4e-4", "training.checkpoint_every=1000", f"training.eval_every={EVAL_EVERY}",
]


CYAN_CHANCE = 1 / 7  # the evaluator tells seven colors apart
LORA_SCALED_DOWN = [
    "data.resolution=16", "data.shapes.num=150", "data.reg_num=150", "training.max_steps=300", "training.batch_size=64",
    "training.eval_every=0", "training.checkpoint_every=1000", "training.warmup_steps=20",
]


@pytest.mark.slow
def test_scaled_down_quick_start_beats_chance(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    train = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "shapes.yaml"),
             f"output_dir={out}", f"data.path={data}", *SCALED_DOWN]
    trained = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert sorted(p.name for p in (out / "samples").glob("*.png")), "no training previews were written"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vae_lr = [m["lr"] for m in metrics if m["stage"] == "vae" and "lr" in m]
    assert vae_lr[-1] < 1e-9 < vae_lr[0], vae_lr  # shapes.yaml anneals the VAE's rate (cosine) to zero
    fidelity = [m for m in metrics if m["stage"] == "ldm" and "eval_position" in m]
    assert [m["step"] for m in fidelity] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)), fidelity

    evaluated = subprocess.run(
        [sys.executable, "-m", "diffusion.eval", "shapes", "--model", str(out / "model"), "--steps", "20"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    scores = json.loads(evaluated.stdout)
    print(json.dumps(scores))
    assert scores["n"] == 90 and scores["steps"] == 20
    assert scores["color"] >= 2 * COLOR_CHANCE and scores["position"] >= 3 * POSITION_CHANCE, scores

    # configs/shapes-lora.yaml, scaled down the same way: a rank-8 adapter teaches the model cyan, a color
    # its data never had; the evaluator's palette holds seven colors, cyan among them.
    lora_out = tmp_path / "lora"
    lora = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "shapes-lora.yaml"),
         f"model.pretrained={out / 'model'}", f"output_dir={lora_out}", f"data.path={tmp_path / 'cyan'}",
         f"data.reg_path={data}", *LORA_SCALED_DOWN],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert lora.returncode == 0, lora.stderr[-2000:]
    assert (lora_out / "lora.safetensors").stat().st_size < 0.1 * (out / "model" / "unet.safetensors").stat().st_size
    rendered, base, adapted = cyan_colors(out / "model", lora_out / "lora.safetensors", tmp_path / "cyan")
    print(json.dumps({"cyan images through the VAE": rendered, "cyan prompts in that color, base": base,
                      "with the adapter": adapted}))
    # The base model never saw cyan and draws it by accident only. The tiny 16 px VAE renders cyan
    # anywhere between blue and green depending on the run ((60, 121, 182) to (50, 173, 136) for
    # (40, 210, 210)), so the adapter is judged by the color this VAE gives real cyan images: it must
    # draw that for cyan prompts well above chance and 10 points more often than the base model does.
    # The full-size VAE renders cyan as cyan and the adapter reaches 97% there (docs/lora.md).
    assert adapted >= CYAN_CHANCE and adapted >= base + 0.1, (rendered, base, adapted)


def cyan_colors(model, lora_file, cyan_dir) -> tuple[str, float, float]:
    """The evaluator's color for the model's VAE round trip of cyan training images (its majority), and
    how often the 15 cyan prompts, three times each (45 images, DDIM 20), come out in that color without
    and with the adapter, from one loaded model."""
    from collections import Counter

    import torch

    from diffusion.data.folder import image_transform, load_image
    from diffusion.eval.fidelity import shapes_prompts
    from diffusion.eval.shapes import classify
    from diffusion.lora.files import read_lora
    from diffusion.pipeline import load_pipeline

    pipe, prompts = load_pipeline(model, device="cpu"), shapes_prompts(["cyan"], repeats=3)
    resolution = pipe.cfg.info.resolution
    x = torch.stack([image_transform(load_image(f), resolution) for f in sorted(cyan_dir.glob("*.png"))[:45]])
    with torch.inference_mode():
        round_trip = pipe.vae.decode(pipe.vae.encode(x).mode())
        rendered = Counter(classify(image)["color"] for image in round_trip).most_common(1)[0][0]

        def share(images):
            return sum(classify(image)["color"] == rendered for image in images) / len(images)

        base = share(pipe.generate(prompts, steps=20, seed=0, batch_size=45))
        pipe.set_loras([(read_lora(lora_file), 1.0)])
        adapted = share(pipe.generate(prompts, steps=20, seed=0, batch_size=45))
    return rendered, base, adapted
