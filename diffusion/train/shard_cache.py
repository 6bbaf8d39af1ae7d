"""The latent and text caches for shards: a folder's chunked memory-mapped arrays (cache.py), one set per shard,
a row per sample in the tar's order, read by the streaming workers in place of decoding.

    cache/shard-latents-<key>/<shard>/latents/000000.npy  posterior mean and std of the shard's samples, tar order
                                      shard.json          written last: the shard's key and row count
    cache/shard-text-<key>/<shard>/text/000000.npy        hidden states of each caption of each sample, in order
                                   offsets.npy            sample k's captions are rows offsets[k] .. offsets[k+1]
                                   shard.json

Shard i is built by rank i % processes. That rank reads the tar once to hash every sample's key and member bytes,
which with the encoders' settings (cache.py's key parts) makes the shard's key, then encodes only the chunks
missing under that key, a chunk at a time, so a killed build resumes. The images are decoded in data.num_workers
DataLoader workers and encoded in the rank's process (_ShardPixels). Nothing is gathered. Training then streams
the shards exactly as without a cache (the same ShardStream order, batch counts and resume) and each sample's
rows are read from the maps; a process keeps the maps of its last SHARD_MAPS shards open, so memory stays flat.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Config, DataConfig
from ..data.shards import _WARNED, IMAGE_KEYS, SAMPLE_BITS, ShardIndex, _samples, decode, sample_captions
from ..io.atomic import atomic_file
from ..io.weights import state_hash
from .cache import ENCODE_BATCH, ChunkedArray, _counted, _key, drop_stale, encode_batches, encode_views
from .distributed import barrier

SHARD_MAPS = 64  # shards whose memory maps each process keeps open
ROW_MASK = (1 << SAMPLE_BITS) - 1  # a sample id's place in its shard: its row


@dataclass(frozen=True)
class ShardRows:
    """Reads a streamed sample's cached rows: picklable, for the DataLoader workers (ShardStream's `read`).

    latents / text: the cache's root folder and row shape, or None when that part is not cached.
    """

    cfg: Config
    names: dict[str, str]  # shard path -> its folder name in the cache
    latents: Optional[tuple[Path, tuple[int, ...]]]
    text: Optional[tuple[Path, tuple[int, ...]]]

    def __call__(self, sample: dict, generator: Optional[torch.Generator] = None) -> Optional[dict]:
        """The sample's item as `decode` gives it, with "moments" (2, views, C, h, w) in place of its pixels when the
        latents are cached and "hidden" (captions, L, D) when the text is; None when it is skipped."""
        k, name = sample["__id__"] & ROW_MASK, self.names[sample["__url__"]]
        if self.latents is None:
            item = decode(sample, self.cfg.data, generator)
        else:
            item = _usable(sample, self.cfg.data.missing_caption)
            array, failed = _mapped(self.latents[0] / name, "latents", self.latents[1])
            if item is None or k in failed:  # the image did not decode, or is below data.min_size
                return None
            item["moments"] = array.read([k])[0]
        if item is not None and self.text is not None:
            array, offsets = _mapped(self.text[0] / name, "text", self.text[1])
            item["hidden"] = array.read(range(offsets[k], offsets[k + 1]))
        return item


def _usable(sample: dict, missing_caption: str) -> Optional[dict]:
    """decode's item without the pixels: captions and id, or None without an image or a caption."""
    captions = _captions(sample)
    if not any(k in sample for k in IMAGE_KEYS) or (not captions and missing_caption != "empty"):
        return None
    return {"captions": captions or [""], "id": sample["__id__"]}


def _captions(sample: dict) -> list[str]:
    try:
        return sample_captions(sample)
    except UnicodeDecodeError:
        return []


@functools.lru_cache(maxsize=SHARD_MAPS)
def _mapped(folder: Path, part: str, row_shape: tuple[int, ...]) -> tuple[ChunkedArray, object]:
    """A shard's array, mapped, with its failed rows (latents) or its caption offsets (text)."""
    meta = json.loads((folder / "shard.json").read_text())
    array = ChunkedArray(folder / part, meta["rows"], row_shape, meta["key"])
    failed = frozenset(array.open())
    return array, np.load(folder / "offsets.npy", mmap_mode="r") if part == "text" else failed


def build_shard_cache(pipe, index: ShardIndex, cfg: Config, cache_dir: Path, accelerator, latents: bool, text: bool) -> Optional[ShardRows]:
    """Build this rank's shards' missing caches (a collective); the reader of every shard's rows, or None when
    nothing is cached. The latent key covers the resolution, flips, data.min_size and missing_caption (which rows
    fail), the VAE's weights and dtype and the latent scale; the text key the layer and the encoder's weights."""
    if not (latents or text):
        return None
    names = _names(index.shards)
    parts = {}
    if latents:
        views, f, C, r = 2 if cfg.data.flip else 1, pipe.vae_factor, pipe.cfg.vae.latent_channels, cfg.data.resolution
        key = _key(["shards", r, views, cfg.data.min_size, cfg.data.missing_caption, state_hash(pipe.vae),
                    str(next(pipe.vae.parameters()).dtype), pipe.cfg.vae.scale_factor])
        parts["latents"] = (cache_dir / f"shard-latents-{key[:16]}", (2, views, C, r // f, r // f), key)
    if text:
        te = pipe.text_encoder
        key = _key(["shards", te.cfg.layer, state_hash(te)])
        parts["text"] = (cache_dir / f"shard-text-{key[:16]}", tuple(te.encode([""]).shape[1:]), key)
    if accelerator.is_main_process:
        for part, (root, _, _) in parts.items():
            drop_stale(cache_dir, f"shard-{part}", keep=root)
    mine = list(range(accelerator.process_index, len(index.shards), accelerator.num_processes))
    # Hash every shard first (and write its text), so that one DataLoader, its workers started once, decodes the
    # images of all the latent chunks still missing.
    bar = tqdm(mine, desc="cache shards", unit="shard", disable=not accelerator.is_main_process, leave=False)
    latent_todo = [todo for s in bar for todo in _build(pipe, index.shards[s], names[str(index.shards[s])], parts)]
    _fill_latents(pipe.vae, latent_todo, cfg.data, accelerator.device, accelerator.is_main_process)
    barrier(accelerator)  # every shard is written before any rank reads it
    return ShardRows(cfg, names, *[(parts[p][0], parts[p][1]) if p in parts else None for p in ("latents", "text")])


def _names(shards: list[Path]) -> dict[str, str]:
    """Each shard's folder in the cache: its stem, or position-stem when stems repeat (a pattern over folders)."""
    stems = [p.stem for p in shards]
    unique = len(set(stems)) == len(stems)
    return {str(p): p.stem if unique else f"{i:05d}-{p.stem}" for i, p in enumerate(shards)}


def _build(pipe, shard: Path, name: str, parts: dict) -> list[tuple[Path, ChunkedArray, list[int]]]:
    """Scan one shard and write what is missing of its text cache; returns (shard, array, missing chunks) for its
    latents when they are not complete, for _fill_latents."""
    digest, counts = _scan(shard)
    latents = []
    for part, (root, row_shape, settings) in parts.items():
        folder, key = root / name, _key([settings, digest])
        if _meta(folder).get("key") == key:
            continue
        if part == "latents":
            array = ChunkedArray(folder / part, len(counts), row_shape, key)
            latents.append((shard, array, array.missing()))
            continue
        offsets = np.cumsum([0, *counts])
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(folder / "offsets.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, offsets)
        array = ChunkedArray(folder / part, int(offsets[-1]), row_shape, key)
        for c in array.missing():
            array.write(c, _encode_text(pipe.text_encoder, shard, array.chunk_rows(c)))
        _complete(shard, array)
    return latents


def _complete(shard: Path, array: ChunkedArray) -> None:
    with atomic_file(array.folder.parent / "shard.json") as tmp:  # last: the shard is complete
        tmp.write_text(json.dumps({"key": array.key, "rows": array.rows, "shard": str(shard)}))


def _scan(shard: Path) -> tuple[str, list[int]]:
    """The hash of every sample's key and member bytes (a re-packed tar of the same samples keeps it), and each
    sample's number of text rows: its captions, or one for ""."""
    h, counts = hashlib.sha256(), []
    for sample in _samples([shard], _WARNED):
        for member in sorted(m for m in sample if not m.startswith("__")):
            h.update(f"{sample['__key__']}.{member}\0".encode() + hashlib.sha256(sample[member]).digest())
        counts.append(len(_captions(sample)) or 1)
    return h.hexdigest(), counts


def _fill_latents(vae, todo: list[tuple[Path, ChunkedArray, list[int]]], data: DataConfig, device, progress: bool) -> None:
    """Write the missing latent chunks of `todo`, then each shard's shard.json: one DataLoader for the whole build
    decodes the images in data.num_workers workers, and this process encodes and writes each chunk as it comes."""
    batches = [(shard, rows) for shard, array, missing in todo
               for c in missing for rows in encode_batches(array.chunk_rows(c))]
    loader = torch.utils.data.DataLoader(_ShardPixels(batches, data), batch_size=None, num_workers=data.num_workers)
    decoded = iter(loader) if batches else iter(())  # no workers started for a cache that is complete
    total = sum(len(rows) for _, rows in batches)
    with tqdm(total=total, desc="cache latents", unit="row", disable=not (total and progress), leave=False) as bar:
        for shard, array, missing in todo:
            for c in missing:
                blocks = (_encoded(vae, next(decoded), shard, rows, array.row_shape, device)
                          for rows in encode_batches(array.chunk_rows(c)))
                array.write(c, _counted(blocks, bar))
            _complete(shard, array)


def _encoded(vae, batch: dict, shard: Path, rows: range, row_shape: tuple[int, ...], device) -> tuple[np.ndarray, list[int]]:
    """encode_views of a decoded batch, which must be the one the chunk expects next: the workers' order is the
    DataLoader's round robin, and a mismatch would write rows into the wrong places."""
    got = (batch["shard"], batch["start"])
    assert got == (str(shard), rows.start), f"decoded {got[0]} row {got[1]} where {shard} row {rows.start} was expected"
    return encode_views(vae, batch["pixels"], row_shape, device)


class _ShardPixels(torch.utils.data.IterableDataset):
    """The center-cropped pixels of each (shard, rows) batch, None for an image that fails: the latent cache's
    decoding, in the DataLoader's workers.

    Worker w of W decodes batches w, w + W, ...: the loader takes one item from each worker in turn, so the batches
    reach the main process in their order and each chunk is written as a stream, never held. (Dealing whole
    shards to the workers would interleave several chunks, each of which would have to wait in memory.) Each worker
    therefore reads every tar up to its last batch, but decodes only its own rows.
    """

    def __init__(self, batches: list[tuple[Path, range]], data: DataConfig):
        self.batches, self.data = batches, data

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        mine = self.batches[info.id :: info.num_workers] if info else self.batches
        for shard, group in itertools.groupby(mine, key=lambda b: b[0]):
            samples, at = _samples([shard], _WARNED), 0  # a sample's place in the tar is its row
            for _, rows in group:
                wanted = itertools.islice(samples, rows.start - at, rows.stop - at)
                at = rows.stop
                yield {"shard": str(shard), "start": rows.start, "pixels": [_pixels(sample, self.data) for sample in wanted]}


def _pixels(sample: dict, data: DataConfig) -> Optional[torch.Tensor]:
    item = decode(sample, data)
    return None if item is None else item["pixels"]


@torch.no_grad()
def _encode_text(text_encoder, shard: Path, rows: range) -> Iterator:
    """(hidden states, []) blocks of the shard's captions in `rows`, in the order of offsets.npy."""
    captions, r = [], 0
    for sample in _samples([shard], _WARNED):
        for caption in _captions(sample) or [""]:
            if r in rows:
                captions.append(caption)
            r += 1
            if len(captions) == ENCODE_BATCH or (captions and r == rows.stop):
                yield text_encoder.encode(captions).float().cpu().numpy(), []
                captions = []
        if r >= rows.stop:
            return


def _meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "shard.json").read_text())
    except (OSError, ValueError):
        return {}
