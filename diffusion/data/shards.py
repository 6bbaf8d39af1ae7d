"""WebDataset tar shards: pack an image-caption folder into them, and stream them to training.

Layout (img2dataset's): `00000.tar`, `00001.tar`, ... each holding `KEY.jpg|png`, `KEY.txt` (captions, one per
line) and `KEY.json`, beside `00000_stats.json` with the shard's sample count. webdataset groups the members of
a sample by the name before the first dot, so a key never holds a dot.

Training reads shards through webdataset with no index of the samples: `ShardOrder` deals each epoch's shards
(permuted by (seed, epoch)) to the (rank, worker) slots, every slot reads its shards through a seeded shuffle
buffer, and every rank yields the same number of batches. Counts come from the stats files, else from one pass
over the tar headers.
"""

from __future__ import annotations

import functools
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from diffusion.config import DataConfig
from diffusion.data.folder import DataError, FolderIndex, _clean, image_transform, index_folder, load_image
from diffusion.errors import warn

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # member extensions that hold a sample's image
SAMPLE_BITS = 24  # a sample's id: shard number << SAMPLE_BITS | its place in the shard


def is_shards(path: str) -> bool:
    """Whether data.path names shards (a brace pattern, a .tar, or a folder of .tar files) rather than images."""
    if not path.strip():
        return True  # an empty pattern: list_shards says what to give instead
    p = Path(path)
    return "{" in path or p.suffix == ".tar" or (p.is_dir() and any(p.glob("*.tar")))


def check_key(key: str, seen: dict[str, str], source: str) -> None:
    """DataError unless `key` is a usable webdataset key not taken yet (seen: key -> where it came from)."""
    if "." in key:
        raise DataError(f"sample key '{key}' (from {source}) holds a dot, where webdataset would split it; rename the file")
    if key in seen:
        raise DataError(f"duplicate sample key '{key}': {seen[key]} and {source}; rename one of them")
    seen[key] = source


# ----------------------------------------------------------------------------- packing


def pack_folder(folder: str, out: str, shard_size: int, cfg: DataConfig) -> FolderIndex:
    """Write the usable pairs of `folder` as shards of `shard_size` samples into `out`; returns the folder's index.

    Keys are the images' paths without the extension, '/' replaced by '_'. JPEG and PNG bytes are copied as they
    are; other formats are written as PNG. Each shard is written under a temporary name, then renamed.
    """
    import webdataset as wds

    from diffusion.io.atomic import atomic_file

    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} exists and is not empty; choose a new folder")
    index = index_folder(folder, cfg, strict=False, progress=True)
    if not index.items:
        raise DataError(f"no usable image-caption pairs in {folder}")
    seen: dict[str, str] = {}
    keys = []
    for path, _ in index.items:
        rel = path.relative_to(index.root).with_suffix("").as_posix()
        keys.append(rel.replace("/", "_"))
        check_key(keys[-1], seen, path.relative_to(index.root).as_posix())
    out_dir.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, len(keys), shard_size)):
        batch = list(zip(keys[start : start + shard_size], index.items[start : start + shard_size]))
        with atomic_file(out_dir / f"{s:05d}.tar") as tmp, open(tmp, "wb") as f:
            sink = wds.TarWriter(f, encoder=False)
            for key, (path, captions) in batch:
                sink.write(_sample(key, path, captions, index))
            sink.close()
        (out_dir / f"{s:05d}_stats.json").write_text(json.dumps({"count": len(batch), "successes": len(batch)}))
    return index


def _sample(key: str, path: Path, captions: list[str], index: FolderIndex) -> dict:
    data = path.read_bytes()
    ext = {"JPEG": "jpg", "PNG": "png"}.get(_image_format(data))
    if ext is None:  # webp, gif, tiff, ...: decoded as training would, stored losslessly
        buf = io.BytesIO()
        load_image(path).save(buf, format="PNG")
        ext, data = "png", buf.getvalue()
    info = index.info[path]
    meta = {"key": key, "file_name": path.relative_to(index.root).as_posix(), "width": info.size[0], "height": info.size[1], "sha256": info.digest}
    return {"__key__": key, ext: data, "txt": "\n".join(captions).encode(), "json": json.dumps(meta).encode()}


def _image_format(data: bytes) -> Optional[str]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.format


# ----------------------------------------------------------------------------- finding shards


@dataclass
class ShardIndex:
    """The shards of data.path and their sample counts: no per-sample index."""

    pattern: str
    shards: list[Path]
    counts: list[int]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(self.counts)

    def report(self) -> str:
        lines = [f"shards: {self.pattern}", f"{len(self.shards)} shards, {len(self):,} samples", *self.notes]
        return "\n".join(lines)

    def captions(self, n: int) -> list[str]:
        """Up to n captions from the first samples: the model card's example prompts."""
        found = []
        for sample in _samples([self.shards[0]], warned=set()):
            found += _clean(sample.get("txt", b"").decode("utf-8", "replace").splitlines())[:1]
            if len(found) >= n:
                break
        return found


def list_shards(pattern: str) -> ShardIndex:
    """The shards that data.path names, with their counts; DataError (one line) when it names none or one is empty."""
    import webdataset as wds

    if not pattern.strip():
        raise DataError("data.path is empty; give an image-caption folder, a folder of .tar shards or a pattern like shards/{00000..00009}.tar")
    if "{" in pattern:
        names = wds.shardlists.expand_urls(pattern)
        found = [Path(n) for n in names if Path(n).is_file()]
        if not found:
            raise DataError(f"data.path {pattern} matches no file ({len(names)} names, the first {names[0]}); check the pattern's folder and range")
        if len(found) < len(names):
            missing = next(n for n in names if not Path(n).is_file())
            raise DataError(f"data.path {pattern} names {len(names)} shards but {len(names) - len(found)} are missing, the first {missing}; fix the range")
    else:
        p = Path(pattern)
        found = [p] if p.is_file() else sorted(p.glob("*.tar"))
        if not found:
            raise DataError(f"no .tar shards at {pattern}")
    index = ShardIndex(pattern, found, [])
    for shard in found:
        n = shard_count(shard, index.notes)
        if n == 0:
            raise DataError(f"shard {shard} holds no image members (KEY.jpg, KEY.png, ...); "
                            "remove it, or write shards with python -m diffusion.data pack FOLDER OUT")
        index.counts.append(n)
    return index


def shard_count(shard: Path, notes: list[str]) -> int:
    """Samples with an image in a shard: from its stats file (ours, img2dataset's), else from the tar headers."""
    stats = shard.with_name(shard.stem + "_stats.json")
    if stats.is_file():
        try:
            return int(json.loads(stats.read_text())["successes"])
        except (ValueError, KeyError, TypeError):
            pass
    keys = set()
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext.lower() in IMAGE_KEYS:
                    keys.add(key)
    except (tarfile.TarError, OSError, EOFError) as e:
        warn(f"shard {shard} is truncated or unreadable ({e}); training uses its first {len(keys)} samples")
        notes.append(f"truncated: {shard} ({len(keys)} samples readable)")
        _WARNED.add(str(shard))
    return len(keys)


# ----------------------------------------------------------------------------- streaming


_WARNED: set[str] = set()  # shards already named in a warning, per process


def _samples(shards: list[Path], warned: set[str]) -> Iterator[dict]:
    """Raw samples of the shards, in order, each with "__id__"; a truncated tar is warned about once and left."""
    import webdataset as wds

    for s, shard in enumerate(shards):
        number = int(shard.stem) if shard.stem.isdigit() else s

        def handler(exn: Exception, shard=shard) -> bool:
            if str(shard) not in warned:
                warned.add(str(shard))
                warn(f"shard {shard} is truncated or unreadable ({exn.args[0] if exn.args else exn}); going on with the next")
            return False  # stop reading this shard

        for k, sample in enumerate(wds.tarfile_to_samples(handler=handler)([{"url": str(shard)}])):
            sample["__id__"] = number << SAMPLE_BITS | k
            yield sample


def decode(sample: dict, cfg: DataConfig, generator: Optional[torch.Generator] = None) -> Optional[dict]:
    """(pixels, captions, id) of a raw sample, or None when its image does not load, is smaller than data.min_size
    or it has no caption. data.crop: random draws from `generator` (the slot's own, so that resume repeats it)."""
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    try:
        captions = sample_captions(sample)
        if image is None or (not captions and cfg.missing_caption != "empty"):
            return None
        if min(_image_size(image)) < cfg.min_size:  # the folder index's rule, from the header before any decoding
            return None
        img = load_image(io.BytesIO(image), min_side=cfg.resolution)
    except Exception:  # noqa: BLE001 - a corrupt member is skipped and counted, never fatal
        return None
    crop = cfg.crop if generator is not None else "center"
    pixels = image_transform(img, cfg.resolution, crop, generator=generator)
    return {"pixels": pixels, "captions": captions or [""], "id": sample["__id__"]}


def sample_captions(sample: dict) -> list[str]:
    """A raw sample's captions (KEY.txt, one per line), cleaned as the folder index cleans them."""
    return _clean(sample.get("txt", b"").decode("utf-8").splitlines())


def _image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.size


@dataclass
class EpochPlan:
    """What one rank reads in one epoch: per worker slot, its shards and how many batches it yields."""

    epoch: int
    start: int  # batches of this epoch already read (a resumed run)
    slots: list[list[Path]]  # this rank's slots: one per DataLoader worker
    per_slot: int  # batches each slot yields


class ShardOrder:
    """Which shards each (rank, worker) reads: a function of (seed, epoch), like train.order.ShardedOrder.

    Each epoch the shards are permuted and dealt, largest pile last, to the least-filled of ranks × workers slots;
    every slot then yields as many batches as the emptiest one holds, so every rank reads the same number.
    """

    def __init__(self, index: ShardIndex, batch_size: int, seed: int, rank: int, world_size: int, workers: int):
        self.index, self.batch_size, self.seed, self.rank = index, batch_size, seed, rank
        self.workers, self.world_size = max(1, workers), world_size
        slots = world_size * self.workers
        if len(index.shards) < slots:
            raise DataError(
                f"{len(index.shards)} shards cannot feed {world_size} processes x {self.workers} data workers: every one "
                f"needs a shard; pack with a smaller --shard-size or lower data.num_workers"
            )
        if self.plan(0).per_slot == 0:
            raise DataError(f"the shards hold too few samples for batch_size {batch_size} on each of {slots} rank x worker slots; "
                            "lower the batch size or data.num_workers, or add data")

    def plan(self, epoch: int, start: int = 0) -> EpochPlan:
        from diffusion.train.order import epoch_seed

        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        slots: list[list[int]] = [[] for _ in range(self.world_size * self.workers)]
        load = [0] * len(slots)
        for s in torch.randperm(len(self.index.shards), generator=g).tolist():
            least = min(range(len(slots)), key=lambda k: (load[k], k))
            slots[least].append(s)
            load[least] += self.index.counts[s]
        mine = slots[self.rank * self.workers : (self.rank + 1) * self.workers]
        per_slot = min(load) // self.batch_size
        return EpochPlan(epoch, start, [[self.index.shards[s] for s in slot] for slot in mine], per_slot)

    def batches(self, epoch: int, start: int = 0) -> EpochPlan:
        return self.plan(epoch, start)


class ShardStream(torch.utils.data.IterableDataset):
    """One epoch of a rank's batches: each DataLoader worker reads its slot's shards through a seeded shuffle buffer.

    A slot yields exactly plan.per_slot batches (re-reading its shards if corrupt members left it short), less
    those a resumed run has read: with W workers batch b of the epoch comes from slot b % W. Each batch carries
    "skipped", the corrupt members its worker passed over since its previous batch.

    `read(sample, generator)` turns a raw sample into an item or None (skipped): by default `decode`, whose
    data.crop: random draws from a generator seeded like the shuffle buffer; with the latent cache,
    train.shard_cache.ShardRows reads the sample's cached rows instead of decoding it.
    """

    def __init__(self, plan: EpochPlan, cfg: DataConfig, batch_size: int, seed: int, exclude: frozenset = frozenset(),
                 read: Optional[Callable[..., Optional[dict]]] = None):
        self.plan, self.cfg, self.batch_size, self.seed, self.exclude = plan, cfg, batch_size, seed, exclude
        self.read = read

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        from diffusion.train.order import epoch_seed

        info, plan = torch.utils.data.get_worker_info(), self.plan
        # The loader asks its workers in turn from worker 0; batch b of the epoch is slot b % W's, so a run resumed
        # at batch `start` gives worker 0 the slot that batch `start` comes from.
        w = ((info.id if info else 0) + plan.start) % len(plan.slots)
        shards = plan.slots[w]
        skip = len(range(w, plan.start, len(plan.slots)))
        skipped, batch, made, rounds = 0, [], 0, 0
        while made < plan.per_slot:
            slot_seed = epoch_seed(self.seed, plan.epoch) * 1009 + w * 101 + rounds
            rng = random.Random(slot_seed)
            crops = torch.Generator().manual_seed(slot_seed)  # data.crop: random, drawn again alike on resume
            read = self.read or functools.partial(decode, cfg=self.cfg)
            raw = (s for s in _samples(shards, _WARNED) if s["__id__"] not in self.exclude)
            usable = 0
            buffer = self.cfg.shuffle_buffer
            for sample in wds.shuffle(bufsize=buffer, initial=buffer, rng=rng)(raw):
                item = read(sample, generator=crops)
                if item is None:
                    skipped += 1
                    continue
                usable += 1
                batch.append(item)
                if len(batch) == self.batch_size:
                    if made >= skip:
                        yield _collate(batch, skipped)
                        skipped = 0
                    made, batch = made + 1, []
                    if made == plan.per_slot:
                        return
            if usable == 0:
                raise DataError(f"no sample of shards {', '.join(map(str, shards))} can be read")
            rounds += 1  # corrupt members left this slot short: read its shards again, in another order


def _collate(items: list[dict], skipped: int) -> dict:
    batch = {"captions": [it["captions"] for it in items], "index": torch.tensor([it["id"] for it in items]), "skipped": skipped}
    for name in ("pixels", "moments"):  # decoded pixels, or cached posterior moments
        if name in items[0]:
            batch[name] = torch.stack([it[name] for it in items])
    if "hidden" in items[0]:  # cached hidden states, one per caption of each sample: a list, as the counts differ
        batch["hidden"] = [it["hidden"] for it in items]
    return batch


def shard_loader(order: ShardOrder, cfg: DataConfig, batch_size: int, seed: int, exclude: frozenset = frozenset(), read=None):
    """load(epoch, plan) for train.order.batch_stream: a DataLoader over the rank's ShardStream (see it for `read`)."""

    def load(epoch: int, plan: EpochPlan):
        stream = ShardStream(plan, cfg, batch_size, seed, exclude, read)
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.num_workers)

    return load


def head(index: ShardIndex, n: int, cfg: DataConfig) -> list[dict]:
    """The first n usable samples in shard order (the VAE's held-back and scale images)."""
    found = []
    for sample in _samples(index.shards, _WARNED):
        item = decode(sample, cfg)
        if item is not None:
            found.append(item)
            if len(found) == n:
                break
    return found
