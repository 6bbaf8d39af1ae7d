"""`python -m diffusion.data FOLDER`: index an image-caption folder and print its report, without training.

Exits 0 when at least one pair is usable, 1 (with one line on stderr) when none is or the folder is
missing or empty.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from diffusion.config import DataConfig
from diffusion.data.folder import DataError, index_folder

_DEFAULTS = DataConfig()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion.data",
        description="Report what training would use from an image-caption folder, and what it would skip and why.",
    )
    parser.add_argument("folder")
    parser.add_argument(
        "--missing-caption", choices=("error", "empty", "skip"), default=_DEFAULTS.missing_caption,
        help=f"policy for images without a caption (default {_DEFAULTS.missing_caption})",
    )
    parser.add_argument(
        "--min-size", type=int, default=_DEFAULTS.min_size,
        help=f"skip images with a side below this many pixels (default {_DEFAULTS.min_size})",
    )
    args = parser.parse_args(argv)
    cfg = DataConfig(path=args.folder, missing_caption=args.missing_caption, min_size=args.min_size)
    try:
        index = index_folder(args.folder, cfg, strict=False)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(index.report())
    if not index.items:
        print(f"error: no usable image-caption pairs in {args.folder}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
