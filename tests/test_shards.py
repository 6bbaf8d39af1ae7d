"""WebDataset shards: packing a folder, finding and counting shards, the per-epoch order over ranks and workers,
corrupt members and truncated tars, the bad-input errors, and a two-process run on shards."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from diffusion.config import DataConfig
from diffusion.data import DataError, generate_shapes
from diffusion.data.__main__ import main as data_main
from diffusion.data.shards import SAMPLE_BITS, ShardOrder, ShardStream, check_key, head, is_shards, list_shards, shard_loader

ROOT = Path(__file__).resolve().parents[1]
CFG = DataConfig(resolution=16, shuffle_buffer=8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 shapes images (16x16) packed as 6 shards of 8."""
    root = tmp_path_factory.mktemp("shards")
    generate_shapes(root / "data", num=48, size=16)
    assert data_main(["pack", str(root / "data"), str(root / "shards"), "--shard-size", "8"]) == 0
    return root / "shards"


def ids(batches) -> list[int]:
    return [i for b in batches for i in b["index"].tolist()]


def stream(index, epoch=0, start=0, rank=0, world=1, batch=4, seed=0, cfg=CFG, read=None):
    plan = ShardOrder(index, batch, seed, rank, world, cfg.num_workers).batches(epoch, start)
    return list(ShardStream(plan, cfg, batch, seed, read=read))


def test_pack_writes_img2datasets_layout_and_reports_like_check(shards, tmp_path, capsys):
    assert sorted(p.name for p in shards.iterdir())[:4] == ["00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"]
    assert json.loads((shards / "00005_stats.json").read_text())["successes"] == 8
    with tarfile.open(shards / "00000.tar") as tar:
        names = tar.getnames()
        assert sorted(names[:3]) == ["00000.json", "00000.png", "00000.txt"] and len(names) == 24
        assert tar.extractfile("00000.png").read() == (shards.parent / "data" / "00000.png").read_bytes()  # bytes as they were
        meta = json.loads(tar.extractfile("00000.json").read())
        assert meta["file_name"] == "00000.png" and (meta["width"], meta["height"]) == (16, 16)
    folder = tmp_path / "mixed"
    generate_shapes(folder, num=3, size=16)
    (folder / "bad.png").write_bytes(b"not a png")
    (folder / "bad.txt").write_text("x")
    capsys.readouterr()
    assert data_main(["pack", str(folder), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "usable: 3  skipped: 1" in out and "wrote 3 samples in 1 shards" in out


def test_pack_refuses_keys_with_dots_and_duplicate_keys(tmp_path, capsys):
    seen = {}
    check_key("cat", seen, "cat.jpg")
    with pytest.raises(DataError, match="duplicate sample key 'cat': cat.jpg and cat.png"):
        check_key("cat", seen, "cat.png")
    folder = tmp_path / "data"
    generate_shapes(folder, num=2, size=16)
    (folder / "00000.png").rename(folder / "a.b.png")
    (folder / "00000.txt").rename(folder / "a.b.txt")
    assert data_main(["pack", str(folder), str(tmp_path / "out")]) == 1
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]  # after the progress bar
    assert line.startswith("error: sample key 'a.b' (from a.b.png) holds a dot") and not (tmp_path / "out").exists()


def test_bad_shard_paths_are_one_line(shards, tmp_path):
    assert is_shards(str(shards)) and is_shards("x/{0..3}.tar") and not is_shards(str(shards.parent / "data"))
    with pytest.raises(DataError, match="data.path is empty"):
        list_shards(" ")
    with pytest.raises(DataError, match=r"matches no file \(10 names, the first .*/nowhere/00000.tar\)"):
        list_shards(f"{tmp_path}/nowhere/{{00000..00009}}.tar")
    with pytest.raises(DataError, match="names 8 shards but 2 are missing, the first .*00006.tar"):
        list_shards(f"{shards}/{{00000..00007}}.tar")
    empty = tmp_path / "captions-only"
    empty.mkdir()
    with tarfile.open(empty / "00000.tar", "w") as tar:
        info = tarfile.TarInfo("00000.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cat"))
    with pytest.raises(DataError, match="shard .*00000.tar holds no image members"):
        list_shards(str(empty))
    assert len(list_shards(f"{shards}/{{00000..00005}}.tar")) == len(list_shards(str(shards))) == 48


def test_too_few_shards_for_the_ranks_and_workers_fail_up_front(shards):
    index = list_shards(str(shards))
    with pytest.raises(DataError, match="6 shards cannot feed 2 processes x 4 data workers"):
        ShardOrder(index, 4, 0, rank=0, world_size=2, workers=4)
    ShardOrder(index, 4, 0, rank=0, world_size=2, workers=3)


def test_ranks_read_disjoint_samples_and_as_many_batches(shards):
    index = list_shards(str(shards))
    per_rank = [stream(index, rank=r, world=2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 6  # 3 shards of 8 each: 24 samples, 6 batches of 4
    seen = [ids(b) for b in per_rank]
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 48
    assert all(b["pixels"].shape == (4, 3, 16, 16) and len(b["captions"]) == 4 for b in per_rank[0])


def test_epoch_orders_differ_and_repeat_exactly_after_a_restart(shards):
    index = list_shards(str(shards))
    first, second = stream(index, epoch=0), stream(index, epoch=1)
    assert ids(first) != ids(second) and sorted(ids(first)) == sorted(ids(second))  # every sample once per epoch
    again = stream(list_shards(str(shards)), epoch=1)  # a new process: the same shards, the same seed
    assert ids(again) == ids(second) and all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(again, second))
    assert ids(stream(index, epoch=1, start=5)) == ids(second[5:])  # resumed after 5 batches: the rest, nothing twice
    assert ids(stream(index, epoch=1, seed=1)) != ids(second)


def test_workers_split_a_ranks_shards_and_resume_at_the_same_batch(shards):
    index = list_shards(str(shards))
    cfg = DataConfig(resolution=16, shuffle_buffer=8, num_workers=2)
    order = ShardOrder(index, 4, 0, rank=0, world_size=1, workers=2)
    load = shard_loader(order, cfg, 4, 0)
    batches = list(load(0, order.batches(0)))
    assert len(batches) == 12 and sorted(ids(batches)) == sorted(ids(stream(index)))
    assert ids(load(0, order.batches(0, start=3))) == ids(batches[3:])


def write_corrupt_shards(folder: Path, shards: Path) -> None:
    """00000.tar copied with one undecodable image and one caption-less sample; 00001.tar cut short."""
    folder.mkdir()
    with tarfile.open(shards / "00000.tar") as src, open(folder / "00000.tar", "wb") as f:
        sink = wds.TarWriter(f, encoder=False)
        groups: dict[str, dict] = {}
        for member in src:
            key, _, ext = member.name.partition(".")
            groups.setdefault(key, {"__key__": key})[ext] = src.extractfile(member).read()
        for k, (key, sample) in enumerate(groups.items()):
            if k == 2:
                sample["png"] = b"\x89PNG broken"
            if k == 5:
                del sample["txt"]
            sink.write(sample)
        sink.close()
    data = (shards / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(data[: len(data) // 2])


def test_corrupt_members_are_skipped_and_counted_and_a_truncated_tar_named_once(shards, tmp_path, capsys):
    folder = tmp_path / "corrupt"
    write_corrupt_shards(folder, shards)
    capsys.readouterr()
    index = list_shards(str(folder))  # no stats files: counted from the headers
    warned = capsys.readouterr().err.strip().splitlines()
    assert len(warned) == 1 and "00001.tar is truncated or unreadable" in warned[0] and index.counts[0] == 8
    batches = stream(index, batch=2)
    assert len(batches) == (8 + index.counts[1]) // 2  # short of two good samples: the shards are read again to fill up
    assert sum(b["skipped"] for b in batches) >= 2
    assert 0 << SAMPLE_BITS | 2 not in ids(batches) and 0 << SAMPLE_BITS | 5 not in ids(batches)
    assert capsys.readouterr().err.count("truncated") == 0  # named once per process, not on every read


@pytest.mark.slow
def test_two_processes_on_shards_read_disjoint_samples_and_end_with_the_same_weights(shards, tmp_path, tiny_model_dir):
    debug, out = tmp_path / "debug", tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
           "--config", str(ROOT / "configs" / "tiny.yaml"), f"data.path={shards}", f"output_dir={out}", "--stage", "ldm",
           f"vae_training.pretrained={tiny_model_dir}", "training.max_steps=3", "training.checkpoint_every=3",
           "training.batch_size=4", "sampling.steps=2", "training.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFUSION_DEBUG_DIR": str(debug)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [[json.loads(line) for line in (debug / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)]
    seen = [[i for rec in recs if "indices" in rec for i in rec["indices"]] for recs in records]
    assert len(seen[0]) == len(seen[1]) == 3 * 4 and not set(seen[0]) & set(seen[1])
    shard_of = [{i >> SAMPLE_BITS for i in s} for s in seen]
    assert not shard_of[0] & shard_of[1]  # whole shards per rank
    assert records[0][-1]["weights"] == records[1][-1]["weights"] and records[0][-1]["ema"] == records[1][-1]["ema"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["data_skipped"] for m in lines if "loss" in m] == [0, 0, 0]
    assert proc.stderr.count("6 shards, 48 samples") == 1


def test_vae_held_back_samples_come_first(shards):
    first = head(list_shards(str(shards)), 3, CFG)
    assert [s["id"] for s in first] == [0, 1, 2] and first[0]["pixels"].shape == (3, 16, 16)


@pytest.mark.parametrize("path, code, message", [
    ("", 1, "error: data.path is empty"),
    ("{root}/none/{{00000..00003}}.tar", 1, "error: data.path {root}/none/{{00000..00003}}.tar matches no file"),
    ("{root}/images.tar", 1, "holds no image members"),
])
def test_bad_data_paths_stop_training_in_one_line(tmp_path, capsys, path, code, message):
    from test_train import TINY, train_main

    with tarfile.open(tmp_path / "images.tar", "w") as tar:
        tar.addfile(tarfile.TarInfo("a.txt"))
    path, message = path.format(root=tmp_path), message.format(root=tmp_path)
    assert train_main(["--config", str(TINY), f"data.path={path}", f"output_dir={tmp_path / 'out'}"]) == code
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error:") and message in line


def test_a_bucket_config_admitting_no_image_stops_training_in_one_line(tmp_path, capsys):
    from test_train import TINY, train_main

    args = ["data.buckets=true", "data.bucket_step=4", "data.bucket_min_side=40", f"output_dir={tmp_path / 'out'}"]
    assert train_main(["--config", str(TINY), *args]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: data.buckets: no bucket of at most 16x16 pixels") and "lower bucket_min_side" in line


# ----------------------------------------------------------------------------- the latent and text cache on shards


def rewrite_caption(src: Path, dst: Path, k: int, caption: bytes) -> None:
    """src's samples copied to dst with sample k's caption replaced (the image bytes unchanged)."""
    with tarfile.open(src) as tar, open(dst, "wb") as f:
        groups: dict[str, dict] = {}
        for member in tar:
            key, _, ext = member.name.partition(".")
            groups.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
        sink = wds.TarWriter(f, encoder=False)
        for i, sample in enumerate(groups.values()):
            sink.write({**sample, "txt": caption} if i == k else sample)
        sink.close()


def test_shard_cache_gives_the_encoders_rows_in_stream_order_and_rebuilds_only_a_changed_shard(shards, tmp_path, tiny_config, monkeypatch):
    import dataclasses
    import shutil
    from types import SimpleNamespace

    from diffusion.pipeline import Pipeline
    from diffusion.train import cache
    from diffusion.train.shard_cache import build_shard_cache

    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    cfg = dataclasses.replace(tiny_config, data=dataclasses.replace(CFG, flip=True),
                              text_encoder=dataclasses.replace(tiny_config.text_encoder, trainable=False))
    torch.manual_seed(0)
    pipe = Pipeline(cfg.pipeline_config())
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True)
    writes, write = [], cache.ChunkedArray.write
    monkeypatch.setattr(cache.ChunkedArray, "write", lambda self, c, blocks: (writes.append(self.folder.parent.name), write(self, c, blocks))[1])

    def build():
        writes.clear()
        return build_shard_cache(pipe, list_shards(str(folder)), cfg, tmp_path / "cache", acc, latents=True, text=True)

    rows = build()
    assert sorted(writes) == sorted(2 * [f"{s:05d}" for s in range(6)])  # latents and text of every shard
    index = list_shards(str(folder))
    plain, cached = stream(index, epoch=1), stream(index, epoch=1, cfg=cfg.data, read=rows)
    assert ids(cached) == ids(plain) and [b["captions"] for b in cached] == [b["captions"] for b in plain]
    with torch.no_grad():
        for p, c in zip(plain[:2], cached[:2]):
            assert c["moments"].shape == (4, 2, 2, 4, 8, 8) and "pixels" not in c
            assert torch.allclose(c["moments"][:, 0, 0], pipe.vae.encode(p["pixels"]).mean, atol=1e-5)
            assert torch.allclose(c["moments"][:, 0, 1], pipe.vae.encode(p["pixels"].flip(-1)).mean, atol=1e-5)
            expected = pipe.text_encoder.encode([caps[0] for caps in p["captions"]]).float()
            assert torch.allclose(torch.stack([h[0] for h in c["hidden"]]), expected, atol=1e-5)
    build()
    assert writes == []  # the same shards and encoders: reused
    rewrite_caption(shards / "00003.tar", folder / "00003.tar", 2, b"a new caption")
    build()
    assert writes == ["00003", "00003"]  # only the changed shard, latents and text
    assert len(list((tmp_path / "cache").glob("shard-latents-*"))) == 1


def test_shard_cache_skips_and_counts_the_rows_that_failed(shards, tmp_path, tiny_config):
    import dataclasses
    from types import SimpleNamespace

    from diffusion.pipeline import Pipeline
    from diffusion.train.shard_cache import build_shard_cache

    folder = tmp_path / "corrupt"
    write_corrupt_shards(folder, shards)
    cfg = dataclasses.replace(tiny_config, data=CFG)
    torch.manual_seed(0)
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True)
    index = list_shards(str(folder))
    rows = build_shard_cache(Pipeline(cfg.pipeline_config()), index, cfg, tmp_path / "cache", acc, latents=True, text=False)
    plain, cached = stream(index, batch=2), stream(index, batch=2, read=rows)
    assert ids(cached) == ids(plain) and sum(b["skipped"] for b in cached) == sum(b["skipped"] for b in plain) >= 2


def test_shard_cache_decoded_in_two_workers_is_the_same_bytes_and_a_killed_build_keeps_whole_chunks(shards, tmp_path, tiny_config, monkeypatch):
    import dataclasses
    import shutil
    from types import SimpleNamespace

    from diffusion.pipeline import Pipeline
    from diffusion.train import cache
    from diffusion.train.shard_cache import build_shard_cache

    monkeypatch.setattr(cache, "CHUNK_ROWS", 4)  # chunks of two encoder calls, so the workers' batches interleave
    monkeypatch.setattr(cache, "ENCODE_BATCH", 2)
    folder = tmp_path / "shards"
    write_corrupt_shards(folder, shards)  # failed rows, marked alike by both builds
    for s in range(2, 6):
        shutil.copy(shards / f"{s:05d}.tar", folder)
    cfg = dataclasses.replace(tiny_config, data=dataclasses.replace(CFG, flip=True))
    torch.manual_seed(0)
    pipe = Pipeline(cfg.pipeline_config())
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True)
    writes, write, kill = [], cache.ChunkedArray.write, []

    def dying(self, c, blocks):  # with `kill`: dies in the middle of the fifth chunk
        writes.append(c)
        return write(self, c, interrupted(blocks) if kill and len(writes) == 5 else blocks)

    def interrupted(blocks):
        yield next(blocks)
        raise RuntimeError("killed")

    def build(workers: int, out: Path) -> dict[str, bytes]:
        writes.clear()
        data = dataclasses.replace(cfg.data, num_workers=workers)
        build_shard_cache(pipe, list_shards(str(folder)), dataclasses.replace(cfg, data=data), out, acc, latents=True, text=False)
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    monkeypatch.setattr(cache.ChunkedArray, "write", dying)
    one = build(0, tmp_path / "one")
    chunks = len(writes)
    kill.append(True)
    with pytest.raises(RuntimeError, match="killed"):
        build(2, tmp_path / "two")
    kill.clear()
    two = build(2, tmp_path / "two")
    assert len(writes) == chunks - 4  # the four whole chunks were kept
    assert two == one and any(json.loads(v).get("failed") for k, v in one.items() if k.endswith(".json"))


def test_random_crops_on_shards_repeat_on_a_restart_and_small_images_are_skipped(shards, tmp_path):
    import dataclasses

    from PIL import Image

    folder = tmp_path / "wide"
    folder.mkdir()
    with open(folder / "00000.tar", "wb") as f:  # 8 landscape images (24x16): a square crop has room to move
        sink = wds.TarWriter(f, encoder=False)
        for k in range(8):
            buf = io.BytesIO()
            Image.fromarray(torch.randint(256, (16, 24, 3), dtype=torch.uint8).numpy()).save(buf, format="PNG")
            sink.write({"__key__": f"{k:05d}", "png": buf.getvalue(), "txt": b"noise"})
        sink.close()
    index = list_shards(str(folder))
    random_crop = dataclasses.replace(CFG, crop="random")
    first, again, centered = stream(index, cfg=random_crop), stream(index, cfg=random_crop), stream(index)
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(first, again))  # seeded per slot and epoch
    assert ids(first) == ids(centered) and not all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(first, centered))
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(stream(index, start=1, cfg=random_crop), first[1:]))
    assert not torch.equal(stream(index, epoch=1, cfg=random_crop)[0]["pixels"], first[0]["pixels"])
    with pytest.raises(DataError, match="can be read"):  # the shapes are 16x16: below data.min_size 17, all skipped
        stream(list_shards(str(shards)), cfg=dataclasses.replace(CFG, min_size=17))


@pytest.mark.slow
def test_resume_on_cached_shards_reaches_the_same_weights_and_each_epoch_reads_another_order(shards, tmp_path, tiny_model_dir, monkeypatch):
    from test_train import assert_same_weights, train_main

    def run(out: Path, *extra: str, stop: str = "") -> list[list[int]]:
        """train.py --stage ldm on the shards (cached latents and text, flips), in this process: each step's indices."""
        debug = tmp_path / f"debug-{len(list(tmp_path.glob('debug-*')))}"
        monkeypatch.setenv("DIFFUSION_DEBUG_DIR", str(debug))
        monkeypatch.setenv("DIFFUSION_STOP_AT", stop)
        args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--stage", "ldm", f"data.path={shards}", f"output_dir={out}",
                f"vae_training.pretrained={tiny_model_dir}", "data.flip=true", "text_encoder.trainable=false",
                "training.max_steps=8", "training.checkpoint_every=4", "sampling.steps=2", *extra]
        assert train_main(args) == 0
        records = [json.loads(line) for line in (debug / "rank0.jsonl").read_text().splitlines()]
        return [rec["indices"] for rec in records if "indices" in rec]

    whole = run(tmp_path / "whole")  # 48 samples: 6 batches of 8 an epoch, so epoch 1 starts at step 7
    assert len(whole) == 8 and len({i for step in whole[:6] for i in step}) == 48
    first = run(tmp_path / "resumed", stop="ldm:3")  # stopped mid-epoch, at batch 3 of 6
    rest = run(tmp_path / "resumed", "--resume")
    assert first + rest == whole  # the restart reads the rest of the epoch as the uninterrupted run did
    assert_same_weights(tmp_path / "whole" / "model" / "unet.safetensors", tmp_path / "resumed" / "model" / "unet.safetensors")
    assert whole[:2] != whole[6:8]  # the first 16 samples of each epoch
    assert list((tmp_path / "whole" / "cache").glob("shard-latents-*/00000/latents/000000.npy"))
