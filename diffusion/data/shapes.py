"""The built-in shapes dataset: one colored shape on black, captioned with its color, shape and position.

It exists so that a CPU-only newcomer can train a model that visibly follows its prompts, and so that
we can measure that it does (see `diffusion.eval.shapes`). The output is an ordinary image-caption
folder (`00000.png` + `00000.txt`), so it goes through exactly the same loader as user data.

    python -m diffusion.data shapes data/shapes --num 2000 --size 32 --seed 0 --held-out "red circle"
    python -m diffusion.data shapes data/cyan --num 300 --colors cyan
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw

from diffusion.config import DataConfig
from diffusion.io.atomic import atomic_folder

# The palette is part of the dataset's definition: the evaluator classifies colors against all of it.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 210),
    "white": (240, 240, 240),
    "cyan": (40, 210, 210),
}
# The colors of the default dataset and all_prompts(). Cyan stays out: the quick-start model never sees
# it, so a LoRA adapter can teach it as a new concept, and the default files stay what they always were.
DEFAULT_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Shape centers as fractions of (width, height); y grows downwards, so "top" is the small y.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
BACKGROUND = (0, 0, 0)
SIDE_RANGE = (0.35, 0.45)  # bounding-box side as a fraction of the image side
JITTER = 0.04  # max center offset from the anchor, as a fraction of the image side
SUPERSAMPLE = 4  # draw at 4x and box-downsample: exact area-coverage anti-aliasing

# A generated folder records how it was made, so that a config asking for another seed, size or held-out
# set is refused instead of silently training on the folder already there.
RECIPE_FILE = ".shapes.json"

_CAPTION_RE = re.compile(r"^\s*an? (\w+) (\w+) in the ([a-z ]+?)\s*\.?\s*$")


def caption(color: str, shape: str, position: str) -> str:
    """The canonical prompt, e.g. caption("red", "circle", "top left") == "a red circle in the top left"."""
    return f"a {color} {shape} in the {position}"


def parse_caption(prompt: str) -> tuple[str, str, str]:
    """Invert `caption`: "a red circle in the top left" -> ("red", "circle", "top left").

    Raises ValueError when the prompt is not a shapes caption.
    """
    m = _CAPTION_RE.match(prompt.lower())
    if not m or m[1] not in COLORS or m[2] not in SHAPES or m[3] not in POSITIONS:
        raise ValueError(f"not a shapes caption: {prompt!r} (expected e.g. {caption('red', 'circle', 'top left')!r})")
    return m[1], m[2], m[3]


def resolve_colors(colors: Sequence[str] | None = None) -> tuple[str, ...]:
    """The color names to draw: DEFAULT_COLORS for None or empty, else `colors` in palette order.

    Palette order and no duplicates make ("cyan", "red") and ("red", "cyan") the same dataset, and the six
    defaults given explicitly the default dataset. ValueError names the valid colors.
    """
    if not colors:
        return DEFAULT_COLORS
    wanted = {colors.lower()} if isinstance(colors, str) else {c.lower() for c in colors}
    unknown = sorted(wanted - COLORS.keys())
    if unknown:
        raise ValueError(f"unknown color {', '.join(map(repr, unknown))}; choose from {', '.join(COLORS)}")
    return tuple(c for c in COLORS if c in wanted)


def all_prompts(colors: Sequence[str] | None = None) -> list[str]:
    """Every color x shape x position prompt, in a fixed order (colors, then shapes, then positions).

    The default colors give the 90 prompts of the default dataset; each color adds 15.
    """
    return [caption(c, s, p) for c in resolve_colors(colors) for s in SHAPES for p in POSITIONS]


def parse_pair(pair: str, colors: Sequence[str] | None = None) -> tuple[str, str]:
    """A held-out pair such as "red circle" -> ("red", "circle"), its color among `colors` (None: the
    defaults); ValueError names the valid words."""
    colors = resolve_colors(colors)
    words = pair.lower().split()
    if len(words) != 2 or words[0] not in colors or words[1] not in SHAPES:
        raise ValueError(
            f"held-out pair {pair!r} must be '<color> <shape>' with color in {', '.join(colors)} "
            f"and shape in {', '.join(SHAPES)}"
        )
    return words[0], words[1]


# ----------------------------------------------------------------------------- drawing


def draw_shape(color: str, shape: str, center: tuple[float, float], side: float, size: int = 32) -> Image.Image:
    """Render one filled, anti-aliased shape on black. `center` and `side` are fractions of the image side."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cx, cy, half = center[0] * big, center[1] * big, side * big / 2
    x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":  # isosceles, pointing up, filling half of its bounding box
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    # BOX averages each 4x4 block, so edge pixels get their exact (to 1/16) coverage.
    return img.resize((size, size), Image.Resampling.BOX)


def _combos(held_out: Iterable[str], colors: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """Every (color, shape, position) allowed for training, in the fixed all_prompts(colors) order."""
    excluded = {parse_pair(p, colors) for p in held_out}
    combos = [(c, s, p) for c in resolve_colors(colors) for s in SHAPES for p in POSITIONS if (c, s) not in excluded]
    if not combos:
        raise ValueError("every (color, shape) pair is held out; nothing left to generate")
    return combos


def _sample(rng: random.Random, anchor: tuple[float, float]) -> tuple[tuple[float, float], float]:
    """A random side and a jittered center, nudged so that the whole shape stays inside the image."""
    side = rng.uniform(*SIDE_RANGE)
    lo, hi = side / 2, 1 - side / 2
    # At the corner anchors a 45% shape with -4% jitter would poke 1.5% past the edge; clamping keeps
    # the offset within the jitter range and keeps the fill ratio the evaluator relies on.
    center = tuple(min(max(a + rng.uniform(-JITTER, JITTER), lo), hi) for a in anchor)
    return center, side


def generate_shapes(
    out_dir: str | Path, num: int, size: int = 32, seed: int = 0, held_out: Sequence[str] = (),
    colors: Sequence[str] | None = None,
) -> list[str]:
    """Write `num` images `{i:05d}.png` with captions `{i:05d}.txt` into out_dir; returns the captions.

    The same arguments give the same bytes. Combinations are drawn as shuffled passes over every allowed
    (color, shape, position), so even a small dataset covers them evenly. `colors` None: DEFAULT_COLORS.
    """
    if num < 1 or size < 8:
        raise ValueError(f"need num >= 1 and size >= 8, got num={num}, size={size}")
    combos = _combos(held_out, colors)
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    captions, order = [], []
    for i in range(num):
        if not order:
            order = list(combos)
            rng.shuffle(order)
        color, shape, position = order.pop()
        center, side = _sample(rng, POSITIONS[position])
        text = caption(color, shape, position)
        draw_shape(color, shape, center, side, size).save(out / f"{i:05d}.png", optimize=False)
        (out / f"{i:05d}.txt").write_text(text + "\n", encoding="utf-8")
        captions.append(text)
    return captions


def _is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def generate_folder(
    out: Path, num: int, size: int, seed: int, held_out: Sequence[str], colors: Sequence[str] | None = None
) -> None:
    """Generate the dataset and its recipe into a temporary folder that becomes `out` whole.

    A crash never leaves a half-written dataset behind, and several ranks can call this at once with no
    collective: each writes identical bytes and the first to finish is kept.
    """
    with atomic_folder(out, replace=False) as tmp:
        generate_shapes(tmp, num, size, seed, held_out, colors)
        recipe = _recipe(num, size, seed, held_out, colors)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe) + "\n", encoding="utf-8")


def _recipe(num: int, size: int, seed: int, held_out: Sequence[str], colors: Sequence[str] | None = None) -> dict:
    return {
        "num": num,
        "size": size,
        "seed": seed,
        "held_out": sorted(" ".join(parse_pair(p, colors)) for p in held_out),
        "colors": list(resolve_colors(colors)),
    }


def ensure_shapes(cfg: DataConfig) -> bool:
    """Generate the shapes dataset at cfg.path when cfg.shapes.generate and the folder is missing or empty.

    Images are generated at cfg.resolution, in the colors of cfg.shapes.colors. Returns True when this call
    wrote the dataset. A folder that this function generated with other settings raises DataError, naming
    the setting that differs.
    """
    out = Path(cfg.path)
    s = cfg.shapes
    if not s.generate:
        return False
    if not _is_empty(out):
        _check_recipe(out, _recipe(s.num, cfg.resolution, s.seed, s.held_out, s.colors))
        return False
    generate_folder(out, s.num, cfg.resolution, s.seed, s.held_out, s.colors)
    return True


def _check_recipe(out: Path, want: dict) -> None:
    from diffusion.data.folder import DataError

    try:
        have = json.loads((out / RECIPE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not generated here (or by an older version): the folder is the user's data
    # Recipes written before the palette grew have no colors; they were made with the default ones.
    have.setdefault("colors", list(DEFAULT_COLORS))
    names = {
        "num": "data.shapes.num",
        "size": "data.resolution",
        "seed": "data.shapes.seed",
        "held_out": "data.shapes.held_out",
        "colors": "data.shapes.colors",
    }
    for key, name in names.items():
        if have.get(key) != want[key]:
            raise DataError(
                f"{out} holds shapes generated with {name}={have.get(key)}, but the config asks for {want[key]}; "
                "set data.path to a new folder, or delete this one to regenerate it"
            )
