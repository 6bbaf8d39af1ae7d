"""Aspect-ratio buckets (kohya's sd-scripts): train each image at about resolution² pixels in the shape nearest
its own, instead of center-cropping every image to a square.

Buckets are (width, height) pairs whose sides step by `step` between a min and a max side, with an area of at
most resolution². Each image goes to the bucket nearest its aspect ratio, is resized to cover it and then
cropped by the least (`data.folder.image_transform`). Batches are drawn from one bucket at a time
(`train.order.BucketOrder`).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from diffusion.config import DataConfig
from diffusion.data.folder import DataError

Size = tuple[int, int]  # (width, height)


def bucket_sizes(resolution: int, min_side: int, max_side: int, step: int) -> list[Size]:
    """Every (w, h) with sides multiples of `step` in [min_side, max_side], the longest side for the other one that
    keeps w·h <= resolution², in both orientations, and the square; sorted by aspect ratio w/h (kohya's
    make_bucket_resolutions)."""
    area = resolution * resolution
    side = resolution // step * step
    sizes = {(side, side)} if min_side <= side <= max_side else set()
    for w in range(-(-min_side // step) * step, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            sizes |= {(w, h), (h, w)}
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def config_buckets(cfg: DataConfig, vae_factor: int) -> list[Size]:
    """The buckets of data.buckets' settings; DataError (one line) when they admit none.

    Sides step by data.bucket_step, else by 8 latent pixels (kohya's 64 for SD's f = 8); they range from
    data.bucket_min_side (else resolution/2) to data.bucket_max_side (else 2·resolution), kohya's 256 and 1024 at 512.
    """
    step = cfg.bucket_step or 8 * vae_factor
    min_side, max_side = cfg.bucket_min_side or cfg.resolution // 2, cfg.bucket_max_side or 2 * cfg.resolution
    sizes = bucket_sizes(cfg.resolution, min_side, max_side, step)
    if not sizes:
        raise DataError(
            f"data.buckets: no bucket of at most {cfg.resolution}x{cfg.resolution} pixels has both sides, in steps of "
            f"{step}, between data.bucket_min_side {min_side} and data.bucket_max_side {max_side}; lower bucket_min_side "
            "or raise bucket_max_side or data.resolution"
        )
    return sizes


def assign(sizes: Sequence[Size], buckets: Sequence[Size]) -> np.ndarray:
    """(N,) index into `buckets` of the bucket nearest each image's aspect ratio (in log space, so 2:1 and 1:2 are
    as far from 1:1); ties go to the earlier bucket."""
    if not sizes:
        return np.zeros(0, dtype=np.int64)
    image = np.log([w / h for w, h in sizes])[:, None]
    bucket = np.log([w / h for w, h in buckets])[None, :]
    return np.abs(image - bucket).argmin(1)


def histogram(assigned: np.ndarray, buckets: Sequence[Size]) -> str:
    """One line per bucket in use: `  64x32  (2.00)  123 images`."""
    counts = Counter(assigned.tolist())
    lines = [f"buckets: {len(counts)} of {len(buckets)} in use"]
    for b in sorted(counts):
        w, h = buckets[b]
        lines.append(f"  {w}x{h}  ({w / h:.2f})  {counts[b]} images")
    return "\n".join(lines)
