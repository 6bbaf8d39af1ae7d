"""Pixel evaluator for the shapes dataset: does an image show the color, shape and position its prompt asks for?

It reads only pixels, so it can score model samples as well as the dataset itself. It is built to
tolerate imperfect samples (a noisy or grey background, soft edges, stray specks):

1. Foreground: the brightness v = max(R, G, B). The background level is the median v (a shape covers at
   most ~20% of the image) and coverage runs from 0 there to 1 at the bright peak. The shape is the
   largest connected blob of pixels more than half covered, plus a rim for soft edges; specks of noise
   elsewhere are ignored.
2. Color: the palette color nearest to the median RGB of the blob's core. The palette is all of COLORS,
   cyan included, although the default dataset leaves cyan out: a model taught cyan (by a LoRA adapter)
   is scored against the same palette as one that was not.
3. Shape: an ideal circle, square and up-pointing triangle, each sized and placed from the blob's mass
   and centroid (which blur preserves) and blurred by a few amounts; the least-squares fit wins.
4. Position: the anchor nearest to the fitted shape's center.
5. Fill: the blob's mass over the area of its extent box (the widths of its column and row profiles).
   An ideal square fills 1, a circle pi/4 and a triangle 1/2. A pinched square with concave sides still
   fits the square template best but fills less, so the strict shape test ("shape_fill") also asks a
   square to fill at least `SQUARE_FILL` of its box, and a circle or triangle to fill less.

An image with no clear foreground gets None for every attribute, which never matches a prompt.
`python -m diffusion.eval folder FOLDER` scores an image-caption folder (e.g. saved samples).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import numpy as np
from PIL import Image

from diffusion.data.shapes import COLORS, POSITIONS, SHAPES, parse_caption

ATTRIBUTES = ("color", "shape", "position")
MIN_CONTRAST = 40.0  # peak minus background (0-255) below which we call the image empty
_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)  # (len(COLORS), 3)
_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side**2
_BLURS = (0.0, 0.04, 0.08, 0.12, 0.16)  # Gaussian sigmas tried, relative to the shape's side
# Halfway between an ideal circle's fill (pi/4) and a square's (1). Blur moves circles and triangles
# towards it (a 32 px circle blurred by 1.6 px fills at most 0.86) but leaves squares at 1.
SQUARE_FILL = 0.89


def _as_array(image: Any) -> np.ndarray:
    """An (H, W, 3) float array in [0, 255] from a PIL image, a uint8 array, or a (3, H, W) tensor in [-1, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if hasattr(image, "detach"):  # a torch tensor, as the trainer's decoder produces it
        t = image.detach().float().cpu().clamp(-1, 1)
        return ((t.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.float64)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {arr.shape}")
    return arr.astype(np.float64)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (a plain BFS: the masks are small)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    best, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask)


def _dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Grow a mask by `radius` pixels (square neighbourhood)."""
    h, w = mask.shape
    for _ in range(radius):
        padded = np.pad(mask, 1)
        mask = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                mask |= padded[dy : dy + h, dx : dx + w]
    return mask


def _render(shape: str, cx: float, cy: float, side: float, h: int, w: int, supersample: int = 4) -> np.ndarray:
    """Pixel coverage (h, w) of an ideal shape with bounding-box center (cx, cy) and side `side`, in pixels."""
    ys = (np.arange(h * supersample) + 0.5) / supersample
    xs = (np.arange(w * supersample) + 0.5) / supersample
    dy, dx = ys[:, None] - cy, xs[None, :] - cx
    half = side / 2
    in_box = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        mask = dx**2 + dy**2 <= half**2
    elif shape == "square":
        mask = in_box
    else:  # triangle pointing up: the half-width grows from 0 at the apex to side/2 at the base
        mask = in_box & (np.abs(dx) <= (dy + half) / 2)
    return mask.reshape(h, supersample, w, supersample).mean(axis=(1, 3))


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix K such that K @ x is x convolved with a Gaussian (zero padding)."""
    if sigma <= 0:
        return np.eye(n)
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    full = np.exp(-0.5 * (np.arange(-n, n + 1) / sigma) ** 2).sum()  # the untruncated kernel's mass
    return np.exp(-0.5 * (offsets / sigma) ** 2) / full


def _fit_shape(coverage: np.ndarray) -> tuple[str, float, float]:
    """The best-fitting (shape, center x, center y) for a soft coverage map, by least squares.

    Blur preserves mass and centroid, so each hypothesis's size follows from the total coverage (circle
    pi/4 s^2, square s^2, triangle s^2/2) and its center from the centroid (a triangle's centroid is s/6
    below its box center). Each hypothesis is then drawn, blurred by a few amounts relative to its size,
    and compared with the pixels; the lowest squared error wins.
    """
    h, w = coverage.shape
    mass = coverage.sum()
    mx = (coverage.sum(axis=0) * (np.arange(w) + 0.5)).sum() / mass
    my = (coverage.sum(axis=1) * (np.arange(h) + 0.5)).sum() / mass
    best = (np.inf, "", 0.0, 0.0)
    for shape in SHAPES:
        side = float(np.sqrt(mass / _AREA[shape]))
        cy = my - side / 6 if shape == "triangle" else my
        sharp = _render(shape, mx, cy, side, h, w)
        for rel_sigma in _BLURS:
            blurred = _blur_matrix(h, rel_sigma * side) @ sharp @ _blur_matrix(w, rel_sigma * side).T
            err = float(((blurred - coverage) ** 2).sum())
            if err < best[0]:
                best = (err, shape, mx, cy)
    return best[1], best[2], best[3]


def fill_ratio(coverage: np.ndarray) -> float:
    """Mass over the extent box of a soft coverage map. The extents are the sums of the column-wise and
    row-wise maximum coverage, so anti-aliased and blurred edges count by their fraction."""
    width, height = coverage.max(axis=0).sum(), coverage.max(axis=1).sum()
    return float(coverage.sum() / (width * height))


def fill_agrees(shape: str, fill: float) -> bool:
    """The strict shape test: squares fill at least SQUARE_FILL of their extent box, other shapes less."""
    return (fill >= SQUARE_FILL) == (shape == "square")


def classify(image: Any) -> dict[str, Any]:
    """Decide color, shape and position from pixels: {"color": ..., "shape": ..., "position": ..., "fill": ...}.

    Accepts a PIL image, an (H, W, 3) uint8 array or a (3, H, W) tensor in [-1, 1]. Every value is None
    when there is no foreground. "fill" is the blob's `fill_ratio`.
    """
    rgb = _as_array(image)
    h, w, _ = rgb.shape
    v = rgb.max(axis=2)
    background, peak = float(np.median(v)), float(np.percentile(v, 99.5))
    if peak - background < MIN_CONTRAST:
        return dict.fromkeys(ATTRIBUTES + ("fill",))
    coverage = np.clip((v - background) / (peak - background), 0, 1)
    blob = _largest_component(coverage > 0.5)

    # Color: the core avoids edge pixels, which are blended with the background.
    core = blob & (coverage > 0.75)
    median = np.median(rgb[core if core.any() else blob], axis=0)
    color = list(COLORS)[int(np.argmin(((_PALETTE - median) ** 2).sum(axis=1)))]

    # Keep the blob and a rim wide enough for blurred edges, and nothing else (noise elsewhere averages
    # out in the median background but would bias the mass and centroid).
    rim = max(2, int(np.ceil(0.3 * np.sqrt(blob.sum()))))
    near = _dilate(blob, rim)
    ys, xs = np.nonzero(near)
    y0, x0 = ys.min(), xs.min()
    crop = np.where(near, coverage, 0.0)[y0 : ys.max() + 1, x0 : xs.max() + 1]
    shape, cx, cy = _fit_shape(crop)

    fx, fy = (cx + x0) / w, (cy + y0) / h
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - fx) ** 2 + (POSITIONS[p][1] - fy) ** 2)
    # Fill: relative to the core's own level, so noise on the shape's face does not count as a gap, and
    # over the blob plus a one-pixel rim, so noise around it does not widen its extents.
    level = float(np.median(coverage[blob]))
    solid = np.where(_dilate(blob, 1), np.clip(coverage / level, 0, 1), 0.0)
    return {"color": color, "shape": shape, "position": position, "fill": fill_ratio(solid)}


def score(images: Sequence[Any], prompts: Sequence[str]) -> dict[str, Any]:
    """Accuracy of `images` against their `prompts`, per attribute and for all three at once.

    Returns {"color", "shape", "position", "all", "shape_fill": accuracies, "fill": {shape: share of that
    shape's prompts whose fill agrees}, "n": N, "correct": {attr: count}}. "shape_fill" counts an image
    whose shape is right by the template fit and by the fill test.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    correct = dict.fromkeys(ATTRIBUTES + ("all", "shape_fill"), 0)
    fills: dict[str, list[bool]] = {}
    for image, prompt in zip(images, prompts):
        want = dict(zip(ATTRIBUTES, parse_caption(prompt)))
        got = classify(image)
        hits = [got[a] == want[a] for a in ATTRIBUTES]
        for a, hit in zip(ATTRIBUTES, hits):
            correct[a] += hit
        correct["all"] += all(hits)
        agrees = got["fill"] is not None and fill_agrees(want["shape"], got["fill"])
        correct["shape_fill"] += hits[1] and agrees
        fills.setdefault(want["shape"], []).append(agrees)
    n = len(images)
    result: dict[str, Any] = {k: (c / n if n else 0.0) for k, c in correct.items()}
    result.update(fill={s: sum(v) / len(v) for s, v in fills.items()}, n=n, correct=correct)
    return result


def format_score(result: dict[str, Any]) -> str:
    """One line such as `n=300  color 100.0%  shape 99.3%  position 100.0%  all 99.3%  shape+fill 98.0%`."""
    parts = [f"{a} {100 * result[a]:.1f}%" for a in ATTRIBUTES + ("all",)]
    return f"n={result['n']}  " + "  ".join(parts) + f"  shape+fill {100 * result['shape_fill']:.1f}%"
