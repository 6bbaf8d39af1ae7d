"""The latent and text caches: encode each image and caption once into memory-mapped files on disk, keyed so that
stale entries are never reused, and read back only the rows of the current batch.

    cache/latents-<key>/<w>x<h>/000000.npy   posterior mean and std of up to CHUNK_ROWS images of one bucket
                                000000.json  written after the .npy: the chunk's key and which rows failed
    cache/text-<key>/all/000000.npy          a frozen text encoder's hidden states, one row per distinct caption

Each rank encodes its share of the missing chunks and writes them itself (nothing is gathered); every rank then
maps all of them. A chunk is written under a temporary name and renamed (io.atomic), so a killed build leaves
whole chunks only and the next run encodes just the missing ones. The memory a run holds does not grow with the
data set: the pages of a memory map are read from disk when a batch touches them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io.atomic import atomic_file
from ..io.weights import state_hash
from .augment import Augmentation, mirror
from .distributed import barrier
from .order import epoch_loader

CHUNK_ROWS = 1024  # rows per file: a killed build loses at most one chunk per rank
ENCODE_BATCH = 32  # images or captions per encoder call


class ChunkedArray:
    """A float32 array of shape (rows, *row_shape) kept as .npy files of CHUNK_ROWS rows under `folder`.

    A chunk counts as written when its .json (written after the .npy) holds this array's key.
    """

    def __init__(self, folder: Path, rows: int, row_shape: tuple[int, ...], key: str):
        self.folder, self.rows, self.row_shape, self.key = folder, rows, tuple(row_shape), key
        self.maps: list[np.ndarray] = []

    def chunk_rows(self, c: int) -> range:
        return range(c * CHUNK_ROWS, min(self.rows, (c + 1) * CHUNK_ROWS))

    def missing(self) -> list[int]:
        """The chunks not yet written with this key."""
        return [c for c in range(-(-self.rows // CHUNK_ROWS)) if self._meta(c).get("key") != self.key]

    def write(self, c: int, blocks: Iterable[tuple[np.ndarray, list[int]]]) -> None:
        """Chunk c from (block of rows, the block's failed rows) pairs, in row order; streamed, never held whole."""
        n, failed = len(self.chunk_rows(c)), []
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self._path(c, ".npy")) as tmp, open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, *self.row_shape)})
            written = 0
            for block, bad in blocks:
                f.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
                failed += [written + r for r in bad]
                written += len(block)
            assert written == n, f"chunk {c}: {written} rows written, expected {n}"
        with atomic_file(self._path(c, ".json")) as tmp:
            tmp.write_text(json.dumps({"key": self.key, "rows": n, "failed": failed}))

    def open(self) -> list[int]:
        """Map every chunk (read-only); returns the failed rows."""
        chunks = range(-(-self.rows // CHUNK_ROWS))
        self.maps = [np.load(self._path(c, ".npy"), mmap_mode="r") for c in chunks]
        return [c * CHUNK_ROWS + r for c in chunks for r in self._meta(c)["failed"]]

    def read(self, rows: Iterable[int]) -> torch.Tensor:
        """The given rows, copied out of the maps: (len(rows), *row_shape)."""
        return torch.from_numpy(np.stack([self.maps[r // CHUNK_ROWS][r % CHUNK_ROWS] for r in rows]))

    def _path(self, c: int, suffix: str) -> Path:
        return self.folder / f"{c:06d}{suffix}"

    def _meta(self, c: int) -> dict:
        try:
            return json.loads(self._path(c, ".json").read_text())
        except (OSError, ValueError):
            return {}


def fill(accelerator, arrays: list[ChunkedArray], encode: Callable[[ChunkedArray, list[list[int]]], Iterator], desc: str) -> None:
    """Write every missing chunk of `arrays`, each rank its share, then map them all (a collective).

    encode(array, row batches) yields (block, failed rows in the block) per batch, in order.
    """
    missing = [(a, c) for a in arrays for c in a.missing()]
    barrier(accelerator)  # every rank has listed the same missing chunks before any is written
    mine = missing[accelerator.process_index :: accelerator.num_processes]
    total = sum(len(a.chunk_rows(c)) for a, c in mine)
    with tqdm(total=total, desc=desc, unit="row", disable=not (total and accelerator.is_main_process), leave=False) as bar:
        for a, c in mine:
            a.write(c, _counted(encode(a, encode_batches(list(a.chunk_rows(c)))), bar))
    barrier(accelerator)


def encode_batches(rows):
    """`rows` cut into encoder calls of ENCODE_BATCH, from the first: a list gives lists, a range ranges."""
    return [rows[i : i + ENCODE_BATCH] for i in range(0, len(rows), ENCODE_BATCH)]


def _counted(blocks: Iterator, bar: tqdm) -> Iterator:
    for block, bad in blocks:
        bar.update(len(block))
        yield block, bad


@torch.no_grad()
def encode_views(vae, pixels: list, row_shape: tuple[int, ...], device) -> tuple[np.ndarray, list[int]]:
    """Rows (B, 2, views, C, h, w) of the posterior mean and std of each image and its mirror (views = row_shape[1]),
    NaN where an image is None; returns (rows, the None positions)."""
    out = torch.full((len(pixels), *row_shape), float("nan"))
    ok = [k for k, p in enumerate(pixels) if p is not None]
    if ok:
        x = torch.stack([pixels[k] for k in ok]).to(device)
        for v, view in enumerate([x, x.flip(-1)][: row_shape[1]]):
            posterior = vae.encode(view)
            out[ok, 0, v], out[ok, 1, v] = posterior.mean.cpu(), posterior.std.cpu()
    return out.numpy(), [k for k in range(len(pixels)) if k not in ok]


def drop_stale(cache_dir: Path, prefix: str, keep: Path) -> None:
    """Remove this cache's older versions (and the single-file caches of earlier releases)."""
    for old in [*cache_dir.glob(f"{prefix}-*"), cache_dir / f"{prefix}.safetensors"]:
        if old != keep and old.exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


class _CachePixels(torch.utils.data.Dataset):
    """Un-augmented pixels of dataset items for the cache builder's DataLoader workers (None when unreadable)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset.pixels_for_cache(i)


class LatentSource:
    """Scaled latents z0 and the U-Net's conditioning for the batches of `batch_stream`.

    Latents: with training.cache_latents and no random crop, each image (and with data.flip its mirror)
    is encoded once, its posterior mean and std are kept in output_dir/cache, and every batch samples
    z = mean + std·n from the rows it reads; otherwise each batch is encoded on the fly. Text: a frozen
    encoder's hidden states are cached per distinct caption (and ""); a trained one (or one with adapters)
    gets token ids. The latent key covers each image's bytes, its bucket and crop, the flips, the VAE's
    weights and dtype and the latent scale; the text key the captions, the layer and the encoder's weights.
    """

    def __init__(self, pipe, dataset, cfg, cache_dir: Path, accelerator, text_trains: bool | None = None, shards=None):
        self.pipe, self.dataset, self.cfg, self.acc = pipe, dataset, cfg, accelerator
        # Token ids for a text encoder that trains (itself, or adapters on it); else cached hidden states.
        self.text_trains = cfg.text_encoder.trainable if text_trains is None else text_trains
        self.device = accelerator.device
        self.augment = Augmentation(dataset, cfg.data)
        self.cached = cfg.training.cache_latents and cfg.data.crop == "center"
        if shards is not None:  # streamed (dataset None): the stream's workers read the rows (shard_cache.ShardRows)
            from .shard_cache import build_shard_cache

            self.shard_rows = build_shard_cache(pipe, shards, cfg, cache_dir, accelerator, self.cached, not self.text_trains)
            if not self.text_trains:
                with torch.no_grad():
                    self.empty = pipe.text_encoder.encode([""]).float()[0].cpu()  # a dropped caption: (L, D)
            return
        self.indices = list(range(len(dataset)))
        if self.cached:
            self.indices = self._latent_cache(cache_dir)
        if dataset is not None and not self.text_trains:
            captions = sorted({c for i in range(len(dataset)) for c in dataset.captions(i)} | {""})
            self.row = {c: r for r, c in enumerate(captions)}
            self.text = self._text_cache(cache_dir, captions)

    def load(self, epoch: int, batches: list[list[int]]) -> Iterable[dict]:
        if self.cached:
            return ({"index": torch.tensor(b)} for b in batches)
        return epoch_loader(self.dataset, self.cfg.data.num_workers, self.cfg.seed)(epoch, batches)

    @torch.no_grad()
    def latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """z0 = z·scale_factor with z ~ q(z|x) of the (possibly mirrored) images: (B, C, h, w)."""
        flips = self.augment.flips(len(batch["index"]), generator).to(self.device)
        if "pixels" in batch:  # not cached
            x = mirror(batch["pixels"].to(self.device), flips)
            return self.pipe.encode(x, generator=generator, sample=True)
        if "moments" in batch:  # streamed shards: the rows came with the batch
            mean, std = self.views(batch["moments"], flips.cpu())
        else:
            mean, std = self.moments(batch["index"].tolist(), flips.cpu())
        noise = torch.randn(mean.shape, generator=generator, device=self.device, dtype=mean.dtype)
        return (mean + std * noise) * self.pipe.cfg.vae.scale_factor

    def moments(self, indices: list[int], flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached posterior (mean, std) of the chosen view of each image (one bucket), on the device: (B, C, h, w) each."""
        bucket = self.latent_arrays[self.dataset.bucket_of[indices[0]]]
        return self.views(bucket.read(int(self.slot[i]) for i in indices), flips)

    def views(self, rows: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the chosen view of each row (B, 2, views, C, h, w), on the device: (B, C, h, w) each."""
        picked = rows[torch.arange(len(rows)), :, flips.long()]  # (B, 2, C, h, w)
        return picked[:, 0].to(self.device), picked[:, 1].to(self.device)

    def conditioning(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Hidden states (B, L, D) from the text cache, or token ids (B, L) for a trainable encoder."""
        if "captions" in batch:
            captions = self.augment.pick(batch["captions"], generator)
        else:
            captions = self.augment.captions(batch["index"].tolist(), generator)
        if self.text_trains:
            return self.pipe.text_encoder.tokenize(captions).to(self.device)
        if "hidden" in batch:  # streamed shards: each sample's captions' rows came with the batch
            rows = [h[caps.index(c)] if c else self.empty for h, caps, c in zip(batch["hidden"], batch["captions"], captions)]
            return torch.stack(rows).to(self.device)
        return self.text.read(self.row[c] for c in captions).to(self.device)

    def _latent_cache(self, cache_dir: Path) -> list[int]:
        """Build what is missing of the latent cache and map it; returns the indices of the images that encoded."""
        ds, d, vae = self.dataset, self.cfg.data, self.pipe.vae
        views, f, C = 2 if d.flip else 1, self.pipe.vae_factor, self.pipe.cfg.vae.latent_channels
        members = [np.flatnonzero(ds.bucket_of == b) for b in range(len(ds.buckets))]  # dataset indices per bucket
        self.slot = np.zeros(len(ds), dtype=np.int64)  # each image's row in its bucket's array
        for m in members:
            self.slot[m] = np.arange(len(m))
        content = hashlib.sha256("".join(ds.info(i).digest for i in range(len(ds))).encode()).hexdigest()
        dtype = str(next(vae.parameters()).dtype)
        key = _key([content, d.resolution, d.crop, views, ds.buckets, _hash(ds.bucket_of),
                    state_hash(vae), dtype, self.pipe.cfg.vae.scale_factor])
        root = cache_dir / f"latents-{key[:16]}"
        self.latent_arrays = [ChunkedArray(root / f"{w}x{h}", len(m), (2, views, C, h // f, w // f), key)
                              for (w, h), m in zip(ds.buckets, members)]
        arrays = {id(a): m for a, m in zip(self.latent_arrays, members)}

        @torch.no_grad()
        def encode(array: ChunkedArray, batches: list[list[int]]) -> Iterator:
            indices = [[int(arrays[id(array)][r]) for r in rows] for rows in batches]
            loader = torch.utils.data.DataLoader(_CachePixels(ds), batch_sampler=indices, num_workers=d.num_workers, collate_fn=list)
            for pixels in loader:
                yield encode_views(vae, pixels, array.row_shape, self.device)

        if self.acc.is_main_process:
            drop_stale(cache_dir, "latents", keep=root)
        fill(self.acc, self.latent_arrays, encode, "cache latents")
        failed = {int(m[r]) for a, m in zip(self.latent_arrays, members) for r in a.open()}
        return [i for i in range(len(ds)) if i not in failed]

    def _text_cache(self, cache_dir: Path, captions: list[str]) -> ChunkedArray:
        te = self.pipe.text_encoder
        key = _key([captions, te.cfg.layer, state_hash(te)])
        root = cache_dir / f"text-{key[:16]}"
        hidden = te.encode([""]).shape[1:]  # (L, D)
        array = ChunkedArray(root / "all", len(captions), tuple(hidden), key)

        @torch.no_grad()
        def encode(_: ChunkedArray, batches: list[list[int]]) -> Iterator:
            for rows in batches:
                yield te.encode([captions[r] for r in rows]).float().cpu().numpy(), []

        if self.acc.is_main_process:
            drop_stale(cache_dir, "text", keep=root)
        fill(self.acc, [array], encode, "cache text")
        array.open()
        return array


def _hash(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _key(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
