"""The training view of an indexed folder: each item's pixels at the training resolution, robust to files
that break after indexing."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from diffusion.config import DataConfig
from diffusion.data.folder import DataError, FolderIndex, ImageInfo, Item, file_digest, image_transform, load_image

log = logging.getLogger("diffusion.data.folder")


class ImageCaptionDataset(torch.utils.data.Dataset):
    """(pixels, first caption, index) of an indexed folder's items.

    In train mode with cfg.crop == "random", each access draws a random crop from torch's RNG; otherwise
    every access is the same center crop. Flips, the choice among several captions and caption dropout
    are drawn by training from its own generator (`diffusion.train.augment`), not here.

    A file that fails to load mid-epoch is warned about once and replaced by the next loadable item,
    so training goes on; "index" in the returned dict names the item actually returned.

    With `buckets` (the (w, h) sizes of data.buckets) each item is cropped to the bucket nearest its aspect
    ratio instead of a square; `bucket_of[i]` indexes `buckets`.
    """

    def __init__(self, source: Union[FolderIndex, Sequence[Item]], cfg: DataConfig, train: bool = True,
                 buckets: Optional[Sequence[tuple[int, int]]] = None):
        self.items: list[Item] = list(source.items if isinstance(source, FolderIndex) else source)
        if not self.items:
            raise DataError("the dataset is empty")
        self.cfg = cfg
        self.train = train
        self._info: dict[Path, ImageInfo] = source.info if isinstance(source, FolderIndex) else {}
        self._warned: set[Path] = set()  # per process: each DataLoader worker warns on its own
        self.buckets = list(buckets) if buckets else [(cfg.resolution, cfg.resolution)]
        self.bucket_of = np.zeros(len(self.items), dtype=np.int64)
        if buckets:
            from diffusion.data.buckets import assign

            self.bucket_of = assign([self.info(i).size for i in range(len(self.items))], self.buckets)

    def __len__(self) -> int:
        return len(self.items)

    def captions(self, i: int) -> list[str]:
        """All captions of item i."""
        return list(self.items[i][1])

    def info(self, i: int) -> ImageInfo:
        """Item i's bytes hash and upright size, from the index (else read from the file now)."""
        path = self.items[i][0]
        if path not in self._info:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                size = ImageOps.exif_transpose(img).size
            self._info[path] = ImageInfo(file_digest(data), size)
        return self._info[path]

    def size(self, i: int) -> tuple[int, int]:
        """(w, h) that item i is trained at: its bucket, or the square of data.resolution."""
        return self.buckets[self.bucket_of[i]]

    def _load(self, i: int) -> Optional[Image.Image]:
        """Item i's image, or None (warned once per file) when it no longer loads."""
        path = self.items[i][0]
        try:
            return load_image(path, min_side=self.cfg.resolution)
        except Exception as e:  # noqa: BLE001 - any decoder error must not stop training
            if path not in self._warned:
                self._warned.add(path)
                log.warning("skipping %s: failed to load (%s); using the next image instead", path, e)
            return None

    def __getitem__(self, i: int) -> dict:
        n = len(self.items)
        for k in range(n):
            j = (int(i) + k) % n
            img = self._load(j)
            if img is not None:
                break
        else:
            raise DataError("no image in the dataset can be loaded any more")
        crop = self.cfg.crop if self.train else "center"
        # i's size, not j's: a batch from one bucket stays one shape when a replacement comes from another
        pixels = image_transform(img, self.cfg.resolution, crop, size=self.size(int(i)))
        return {"pixels": pixels, "caption": self.items[j][1][0], "index": j}

    def pixels_for_cache(self, i: int) -> Optional[torch.Tensor]:
        """Item i's un-augmented pixels (3, h, w) at its size: center crop, no flip; flip the result for the mirrored copy.

        Only meaningful with cfg.crop == "center" (a random crop cannot be cached). Returns None, after a
        warning, when the file no longer loads: drop the item from the cache rather than pair it with
        another image's latents.
        """
        if self.cfg.crop != "center":
            raise ValueError("latents can only be cached with data.crop=center; random crops change every epoch")
        img = self._load(i)
        return None if img is None else image_transform(img, self.cfg.resolution, size=self.size(i))
