"""Aspect-ratio buckets (kohya's method): the bucket sizes, the nearest bucket, cover-and-crop, batches from one
bucket in an order that is a function of (seed, epoch), the histogram, and a model trained on them."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.config import ConfigError, DataConfig, load_config
from diffusion.data import ImageCaptionDataset, image_transform, index_folder
from diffusion.data.__main__ import main as data_main
from diffusion.data.buckets import assign, bucket_sizes, config_buckets
from diffusion.train.order import BucketOrder

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# tiny.yaml: f = 2 and one U-Net downsampling, so sides step by 4; buckets of about 16x16 from 8 to 32.
BUCKETS = ["data.buckets=true", "data.bucket_step=4", "data.bucket_min_side=8", "data.bucket_max_side=32"]
SHAPES = {"wide": (24, 16), "tall": (16, 24), "square": (16, 16)}


def write_folder(root: Path, per_shape: int = 12) -> Path:
    """per_shape images of each of SHAPES, each of one random color with a caption naming its shape."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for name, (w, h) in SHAPES.items():
        for k in range(per_shape):
            pixels = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (h, w, 3))
            Image.fromarray(np.ascontiguousarray(pixels)).save(root / f"{name}{k:02d}.png")
            (root / f"{name}{k:02d}.txt").write_text(f"a {name} picture")
    return root


def test_buckets_are_kohyas_at_512():
    sizes = bucket_sizes(512, 256, 1024, 64)
    assert {(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (768, 320), (1024, 256)} <= set(sizes)
    assert len(sizes) == 17 and (960, 256) in sizes and (704, 320) in sizes
    assert all(w * h <= 512 * 512 and w % 64 == 0 == h % 64 and 256 <= min(w, h) <= max(w, h) <= 1024 for w, h in sizes)
    assert all(h == 512 * 512 // w // 64 * 64 or w == 512 * 512 // h // 64 * 64 for w, h in sizes)  # the longest other side
    assert [w / h for w, h in sizes] == sorted(w / h for w, h in sizes)


def test_each_image_goes_to_the_nearest_aspect_and_is_covered_then_cropped_by_the_least():
    sizes = bucket_sizes(512, 256, 1024, 64)
    picked = [sizes[b] for b in assign([(900, 600), (600, 900), (1000, 1000), (4000, 500)], sizes)]
    assert picked == [(640, 384), (384, 640), (512, 512), (1024, 256)]
    img = Image.new("RGB", (90, 60), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 3, 60))  # a blue strip at the far left: cropped away only from a wider image
    assert image_transform(img, 16, size=(24, 16)).shape == (3, 16, 24)  # same aspect: resized, nothing cut
    x = image_transform(img, 16, size=(16, 16))
    assert x.shape == (3, 16, 16) and x[2, :, 0].max() < 0  # a square crop cuts the sides equally: no blue left
    # A square bucket is the old square transform, pixel for pixel.
    assert torch.equal(image_transform(img, 16, size=(16, 16)), image_transform(img, 16))


def test_a_bucket_config_that_admits_no_image_is_one_line():
    with pytest.raises(ConfigError, match="no bucket of at most 16x16 pixels.*bucket_min_side 24 and data.bucket_max_side 20"):
        load_config(TINY, ["data.buckets=true", "data.bucket_step=4", "data.bucket_min_side=24", "data.bucket_max_side=20"])
    with pytest.raises(ConfigError, match="data.bucket_step \\(6\\) must be a multiple of 4"):
        load_config(TINY, ["data.buckets=true", "data.bucket_step=6"])
    assert config_buckets(DataConfig(resolution=16, bucket_step=4), vae_factor=2)  # defaults: 8 to 32


def test_bucket_batches_are_one_bucket_and_a_function_of_seed_and_epoch():
    bucket_of = [i % 3 for i in range(40)]  # 14, 13 and 13 images in three buckets
    ranks = [BucketOrder(list(range(40)), bucket_of, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == (3 + 3 + 3) // 2 == 4  # real full batches per bucket, not 40 / 4 / 2
    for epoch in range(3):
        mine = [o.batches(epoch) for o in ranks]
        assert [len(b) for b in mine] == [4, 4]
        assert all(len({bucket_of[i] for i in batch}) == 1 and len(batch) == 4 for b in mine for batch in b)
        flat = [[i for batch in b for i in batch] for b in mine]
        assert not set(flat[0]) & set(flat[1]) and len(set(flat[0])) == 16
    assert ranks[0].batches(0) != ranks[0].batches(1)  # a new order each epoch
    again = BucketOrder(list(range(40)), bucket_of, 4, seed=5, rank=0, world_size=2)
    assert again.batches(2, start=1) == ranks[0].batches(2)[1:]  # what a resumed run reads
    assert BucketOrder(list(range(40)), bucket_of, 4, seed=6, rank=0, world_size=2).batches(0) != ranks[0].batches(0)


def test_check_prints_the_bucket_histogram(tmp_path, capsys):
    folder = write_folder(tmp_path / "data", per_shape=2)
    assert data_main([str(folder), "--buckets", "16", "--bucket-step", "4", "--bucket-min-side", "8"]) == 0
    out = capsys.readouterr().out
    assert "usable: 6  skipped: 0" in out and "buckets: 3 of 9 in use" in out
    assert "  12x20  (0.60)  2 images" in out and "  16x16  (1.00)  2 images" in out and "  20x12  (1.67)  2 images" in out


def test_cached_latents_of_each_bucket_have_its_shape(tmp_path, tiny_config, tiny_pipeline):
    from diffusion.train.cache import LatentSource

    folder = write_folder(tmp_path / "data", per_shape=3)
    cfg = load_config(TINY, [f"data.path={folder}", *BUCKETS, "data.flip=true"])
    cfg = dataclasses.replace(cfg, text_encoder=tiny_config.text_encoder)
    dataset = ImageCaptionDataset(index_folder(folder, cfg.data), cfg.data, buckets=config_buckets(cfg.data, 2))
    cpu = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True)
    source = LatentSource(tiny_pipeline, dataset, cfg, tmp_path / "cache", cpu)
    g = torch.Generator().manual_seed(0)
    for name, (w, h) in (("square", (16, 16)), ("tall", (12, 20)), ("wide", (20, 12))):
        idx = [i for i, (p, _) in enumerate(dataset.items) if p.name.startswith(name)]
        z = source.latents({"index": torch.tensor(idx)}, g)
        assert z.shape == (3, 4, h // 2, w // 2)
        x = torch.stack([dataset.pixels_for_cache(i) for i in idx])
        with torch.no_grad():
            mean = source.moments(idx, torch.zeros(3, dtype=torch.bool))[0]
            assert torch.allclose(mean, tiny_pipeline.vae.encode(x).mean, atol=1e-5)


@pytest.mark.slow
def test_a_model_trained_with_buckets_draws_non_square_images(tmp_path, tiny_model_dir):
    """sample.py --height/--width reach Pipeline.generate, which is what this calls."""
    from diffusion.pipeline import Pipeline

    folder = write_folder(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(TINY), f"data.path={folder}", f"output_dir={out}",
           "data.shapes.generate=false", *BUCKETS, f"vae_training.pretrained={tiny_model_dir}", "training.max_steps=4",
           "training.batch_size=4", "training.checkpoint_every=4", "sampling.steps=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "buckets: 3 of 9 in use" in proc.stderr and "20x12  (1.67)  12 images" in proc.stderr
    pipe = Pipeline.load(out / "model")
    images = pipe.generate(["a wide picture", "a tall picture"], steps=2, seed=0, height=12, width=20)
    assert [im.size for im in images] == [(20, 12)] * 2
    [tall] = pipe.generate(["a tall picture"], steps=2, seed=0, height=20, width=12)
    assert tall.size == (12, 20)
