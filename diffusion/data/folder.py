"""Image-caption folders: index once, load robustly, transform to training tensors.

Layouts (both may be mixed in one tree, searched recursively; a metadata entry beats a sidecar file):

- kohya style: `cat.jpg` beside `cat.txt` (or `cat.caption`); one caption per line.
- Hugging Face imagefolder: `metadata.jsonl` with `file_name` and `text` (a string or a list of
  strings), or `metadata.csv` with the same columns; `file_name` is relative to the metadata file.

The index is built once before training and is a pure function of the folder's contents, sorted, so
every rank of a multi-process run can build the same index on its own with no collective. Indexing
verifies each image cheaply but completely enough to catch truncation (see `_inspect_image`). Every
file that is left out is recorded with a reason; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from diffusion.errors import ToolkitError
from diffusion.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt", ".caption")  # sidecar caption files, in order of preference
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SHOW_PATHS = 3  # paths listed per skip reason in the report
ORIENTATION_TAG = 0x0112  # EXIF orientation

Item = tuple[Path, list[str]]


class ImageInfo(NamedTuple):
    """What indexing learns of an image beyond its captions: a hash of its bytes and its upright size."""

    digest: str  # the latent cache's key: an edited image is re-encoded even at the same size and mtime
    size: tuple[int, int]  # (width, height) after EXIF orientation: what aspect buckets sort by


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class DataError(ToolkitError, ValueError):
    """A dataset that cannot be trained on. The message is one line, fit to print as the CLI's error."""


@dataclass
class FolderIndex:
    """The usable (image, captions) pairs of a folder, in sorted order, and every file left out."""

    root: Path
    items: list[Item] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, "reason: detail")
    formats: Counter = field(default_factory=Counter)  # PIL format of the usable images, e.g. JPEG
    uncaptioned: list[Path] = field(default_factory=list)  # images without a caption, whatever the policy
    notes: list[str] = field(default_factory=list)  # warnings for the report
    info: dict[Path, ImageInfo] = field(default_factory=dict)  # per usable image

    def __len__(self) -> int:
        return len(self.items)

    def report(self) -> str:
        """A human-readable summary that ends with the line `usable: N  skipped: M`."""
        lines = [f"folder: {self.root}"]
        formats = ", ".join(f"{fmt} {n}" for fmt, n in sorted(self.formats.items())) or "none"
        lines.append(f"usable pairs: {len(self.items)}  (formats: {formats})")
        captions = [c for _, caps in self.items for c in caps]
        if captions:
            words = [len(c.split()) for c in captions]
            chars = [len(c) for c in captions]
            multi = sum(len(caps) > 1 for _, caps in self.items)
            lines.append(
                f"captions: {len(captions)} ({multi} images have several)  "
                f"words min {min(words)} mean {np.mean(words):.1f} max {max(words)}  "
                f"chars min {min(chars)} mean {np.mean(chars):.1f} max {max(chars)}"
            )
            empty = sum(c == "" for c in captions)
            if empty:
                lines.append(f"empty captions: {empty} (images without a caption, data.missing_caption=empty)")
        if self.skipped:
            lines.append(f"skipped: {len(self.skipped)}")
            by_reason: dict[str, list[tuple[Path, str]]] = {}
            for path, reason in self.skipped:
                by_reason.setdefault(reason.split(":")[0], []).append((path, reason))
            for kind, entries in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
                lines.append(f"  {kind}: {len(entries)}")
                for path, reason in entries[:SHOW_PATHS]:
                    detail = reason.split(": ", 1)[-1]
                    lines.append(f"    {self._rel(path)}  ({detail})")
                if len(entries) > SHOW_PATHS:
                    lines.append(f"    ... and {len(entries) - SHOW_PATHS} more")
        lines.extend(self.notes)
        lines.append(f"usable: {len(self.items)}  skipped: {len(self.skipped)}")
        return "\n".join(lines)

    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)


class _Skip(Exception):
    """Internal: a file is unusable; the message is the reason recorded in the index."""


# ----------------------------------------------------------------------------- images


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited onto white, 16-bit is scaled, not clipped."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # PIL's convert("L") clips these to 255 instead of scaling. Integer images are taken as 16-bit
        # when they exceed 8-bit range; float images as [0, 1] when they fit in it.
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max(initial=0)
        scale = 1.0 if top <= 255 else 257.0
        if img.mode == "F" and top <= 1.0:
            scale = 1 / 255
        gray = np.clip(arr / scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")  # also applies palette alpha and tRNS color keys
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(path: Union[str, Path], min_side: Optional[int] = None) -> Image.Image:
    """Open an image file as RGB: first frame of animations, EXIF orientation applied, any mode converted.

    With `min_side`, a JPEG may be decoded at a reduced scale (1/2 .. 1/8) whose shorter side is still at
    least min_side pixels: much faster for large photos trained at low resolution.
    """
    with Image.open(path) as img:
        img.seek(0)
        if min_side and img.format in ("JPEG", "MPO"):  # MPO: phone JPEGs with extra frames
            w, h = img.size
            k = min_side / min(w, h)
            img.draft(img.mode, (max(1, round(w * k)), max(1, round(h * k))))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def image_transform(
    img: Image.Image,
    resolution: int,
    crop: str = "center",
    generator: Optional[torch.Generator] = None,
    size: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """Resize to cover `size` (w, h), default a square of side `resolution`, and crop the excess; returns (3, h, w)
    in [-1, 1].

    For a square this resizes the shorter side to `resolution`. crop is "center" or "random". A random crop
    draws from torch's RNG (or `generator`), so the trainer's seeding makes it reproducible.
    """
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    out_w, out_h = size or (resolution, resolution)
    w, h = img.size
    scale = max(out_w / w, out_h / h)
    new_w, new_h = max(out_w, round(w * scale)), max(out_h, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if crop == "center":
        left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    else:
        left = int(torch.randint(new_w - out_w + 1, (1,), generator=generator))
        top = int(torch.randint(new_h - out_h + 1, (1,), generator=generator))
    img = img.crop((left, top, left + out_w, top + out_h))
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, h, w)


@contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make PIL raise on truncated files even if some other library allowed them process-wide."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _inspect_image(path: Path, data: bytes, min_size: int) -> tuple[str, tuple[int, int]]:
    """Check that the image `data` (read from `path`) will load; return (PIL format, upright (w, h)) or raise
    _Skip with the reason.

    The header gives format and size, so bombs and tiny images are rejected before any decoding.
    verify() checks the PNG chunk CRCs. Then one real decode catches truncation, which verify() misses
    for JPEG; JPEGs decode via DCT scaling at 1/8 size, which still reads the whole stream but costs
    little, so a multi-GPU start is not held up by indexing.
    """
    if not data:
        raise _Skip("empty file: 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we report it ourselves
            with Image.open(io.BytesIO(data)) as img:
                fmt, (w, h) = img.format, img.size
                limit = Image.MAX_IMAGE_PIXELS
                if limit and w * h > limit:
                    raise _Skip(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds PIL's limit of {limit}")
                if min(w, h) < min_size:
                    raise _Skip(f"too small: {w}x{h}, data.min_size is {min_size}")
                img.verify()
            with Image.open(io.BytesIO(data)) as img:  # verify() leaves the image unusable; reopen to decode
                if img.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8):  # exif_transpose turns these a quarter
                    w, h = h, w
                if fmt in ("JPEG", "MPO"):
                    img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
    except _Skip:
        raise
    except UnidentifiedImageError:
        raise _Skip(f"not an image: PIL cannot identify {path.suffix} content") from None
    except Image.DecompressionBombError as e:
        raise _Skip(f"decompression bomb: {e}") from None
    except Exception as e:  # noqa: BLE001 - corrupt files raise almost anything from inside the decoders
        msg = str(e) or type(e).__name__
        kind = "truncated" if isinstance(e, EOFError) or "truncated" in msg.lower() else "unreadable"
        raise _Skip(f"{kind}: {msg}") from None
    return fmt or "unknown", (w, h)


# ----------------------------------------------------------------------------- captions


def _decode_text(path: Path) -> str:
    """UTF-8 text without a byte-order mark; _Skip if it is not valid UTF-8."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Skip(f"caption not valid UTF-8: {path.name} (byte {e.start})") from None


def _clean(captions: Sequence[str]) -> list[str]:
    """Strip whitespace and stray BOMs; drop empty captions."""
    out = [c.replace("\ufeff", "").strip() for c in captions]
    return [c for c in out if c]


def _read_sidecar(image: Path) -> Optional[list[str]]:
    """Captions from `image`'s .txt/.caption file (one per line), or None when there is no such file."""
    for ext in CAPTION_EXTENSIONS:
        for path in (image.with_suffix(ext), image.with_suffix(ext.upper())):  # CAT.JPG + CAT.TXT
            if path.is_file():
                return _clean(_decode_text(path).splitlines())
    return None


def _read_metadata(path: Path, skipped: list[tuple[Path, str]]) -> dict[Path, list[str]]:
    """Captions by resolved image path from one metadata.jsonl / metadata.csv; bad rows go to `skipped`."""
    try:
        text = _decode_text(path)
    except _Skip as e:
        skipped.append((path, str(e)))
        return {}
    rows: list[tuple[int, object]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                skipped.append((path, f"bad metadata: line {n} is not JSON ({e.msg})"))
    else:
        rows = [(n, row) for n, row in enumerate(csv.DictReader(io.StringIO(text)), 2)]
    captions: dict[Path, list[str]] = {}
    for n, row in rows:
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name:
            skipped.append((path, f"bad metadata: line {n} has no file_name"))
            continue
        text_field = row.get("text")
        values = text_field if isinstance(text_field, list) else [text_field] if text_field is not None else []
        if not all(isinstance(v, str) for v in values):
            skipped.append((path, f"bad metadata: line {n} has a text that is not a string or a list of strings"))
            continue
        image = (path.parent / name).resolve()
        if not image.is_file():
            skipped.append((path.parent / name, f"missing file: listed in {path.name} line {n}"))
            continue
        captions[image] = _clean(values)
    return captions


# ----------------------------------------------------------------------------- indexing


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """(image files, metadata files) under root, sorted; hidden files and folders (".git", "._x.jpg") are ignored."""
    images, metadata = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if name in METADATA_FILES:
                metadata.append(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path)
    return sorted(images, key=lambda p: p.relative_to(root).as_posix()), metadata


def index_folder(path: Union[str, Path], cfg: DataConfig, strict: bool = True, progress: bool = False) -> FolderIndex:
    """Index an image-caption folder: the usable pairs in sorted order, and every skipped file with a reason.

    Images without a caption follow cfg.missing_caption: "error" raises DataError listing them, "empty"
    trains them with the caption "", "skip" records them as skipped. With strict=False (the report CLI)
    nothing but a missing or imageless folder raises: "error" images are recorded as skipped and an
    index with no usable pairs is returned as it is. `progress` shows a progress bar.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"data path not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    images, metadata_files = _walk(root)
    if not images:
        raise DataError(f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")

    index = FolderIndex(root=root)
    metadata: dict[Path, list[str]] = {}
    for meta in metadata_files:
        metadata.update(_read_metadata(meta, index.skipped))

    def check(image: Path) -> tuple[Path, Union[tuple[str, ImageInfo], _Skip], Optional[list[str]]]:
        try:
            data = image.read_bytes()  # one read serves the checks and the cache key; one image per thread
            fmt, size = _inspect_image(image, data, cfg.min_size)
            captions = metadata.get(image.resolve())
            return image, (fmt, ImageInfo(file_digest(data), size)), captions if captions is not None else _read_sidecar(image)
        except _Skip as e:
            return image, e, None

    # PIL decodes without the GIL, so threads help on big folders; map() keeps the sorted order.
    with _strict_truncation(), ThreadPoolExecutor(max_workers=max(1, cfg.num_workers)) as pool:
        checked = tqdm(pool.map(check, images), total=len(images), desc="index", unit="img", disable=not progress, leave=False)
        for image, found, captions in checked:
            if isinstance(found, _Skip):
                index.skipped.append((image, str(found)))
                continue
            if not captions:
                index.uncaptioned.append(image)
                if cfg.missing_caption == "skip" or (cfg.missing_caption == "error" and not strict):
                    why = "the caption is empty" if captions == [] else "no .txt/.caption file or metadata entry"
                    index.skipped.append((image, f"no caption: {why}"))
                    continue
                captions = [""]
            fmt, index.info[image] = found
            index.items.append((image, captions))
            index.formats[fmt] += 1

    _check_usable(index, cfg, strict)
    return index


def _check_usable(index: FolderIndex, cfg: DataConfig, strict: bool) -> None:
    """Raise DataError for uncaptioned images under missing_caption "error" or for no usable pair (strict);
    else leave a note for the report."""
    root = index.root
    if not strict and cfg.missing_caption == "error" and index.uncaptioned:
        index.notes.append(
            f"note: training stops on the {len(index.uncaptioned)} images without a caption unless "
            "data.missing_caption is 'empty' or 'skip'"
        )
    if strict and cfg.missing_caption == "error" and index.uncaptioned:
        shown = ", ".join(index._rel(p) for p in index.uncaptioned[:SHOW_PATHS])
        more = f" and {len(index.uncaptioned) - SHOW_PATHS} more" if len(index.uncaptioned) > SHOW_PATHS else ""
        raise DataError(
            f"{len(index.uncaptioned)} images in {root} have no caption: {shown}{more}; add .txt files "
            "or set data.missing_caption to 'empty' (train them unconditionally) or 'skip'"
        )
    if strict and not index.items:
        kinds = Counter(reason.split(":")[0] for _, reason in index.skipped)
        why = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
        raise DataError(f"no usable image-caption pairs in {root}: {len(index.skipped)} files skipped ({why})")
