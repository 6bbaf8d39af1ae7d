"""Prepare and inspect training data.

    python -m diffusion.data [check] FOLDER [--missing-caption error|empty|skip] [--min-size N]
                                        [--buckets RESOLUTION [--bucket-step 64] [--bucket-min-side N] [--bucket-max-side N]]
    python -m diffusion.data pack FOLDER OUT [--shard-size 1000] [--missing-caption ...] [--min-size N]
    python -m diffusion.data shapes OUT [--num 2000] [--size 32] [--seed 0] [--held-out "red circle" ...]
                                        [--colors cyan ...]

`check` indexes an image-caption folder and prints what training would use and what it would skip,
and why (with --buckets, also how many images each aspect bucket of about RESOLUTION² pixels would get);
it fails (exit 1) when nothing is usable. `check` may be left out. `pack` writes the usable pairs as WebDataset
tar shards (img2dataset's layout: KEY.jpg|png, KEY.txt, KEY.json), reporting as `check` does. `shapes` writes the built-in shapes folder, in the six
default colors unless --colors names others (e.g. cyan, which the default data set leaves out).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from diffusion.cli import ArgumentParser, run_main
from diffusion.config import DataConfig
from diffusion.errors import UsageError

_DEFAULTS = DataConfig()


def parse_args(argv: Sequence[str] | None):
    parser = ArgumentParser(prog="python -m diffusion.data", description="Prepare and inspect training data.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="report what training would use from an image-caption folder")
    check.add_argument("folder")
    check.add_argument(
        "--missing-caption", choices=("error", "empty", "skip"), default=_DEFAULTS.missing_caption,
        help=f"policy for images without a caption (default {_DEFAULTS.missing_caption})",
    )
    check.add_argument(
        "--min-size", type=int, default=_DEFAULTS.min_size,
        help=f"skip images with a side below this many pixels (default {_DEFAULTS.min_size})",
    )
    check.add_argument("--buckets", type=int, metavar="RESOLUTION",
                       help="print the aspect-bucket histogram for data.resolution RESOLUTION (data.buckets)")
    check.add_argument("--bucket-step", type=int, default=64, help="bucket sides step by this (default 64: SD's f=8 x 8)")
    check.add_argument("--bucket-min-side", type=int, default=0, help="default: RESOLUTION/2")
    check.add_argument("--bucket-max-side", type=int, default=0, help="default: 2 x RESOLUTION")
    pack = commands.add_parser("pack", help="write an image-caption folder as WebDataset tar shards")
    pack.add_argument("folder")
    pack.add_argument("out", help="output folder (must be missing or empty)")
    pack.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    for sub in (pack,):
        sub.add_argument("--missing-caption", choices=("error", "empty", "skip"), default="skip",
                         help="images without a caption: skip them (default), pack them with an empty one, or stop")
        sub.add_argument("--min-size", type=int, default=_DEFAULTS.min_size, help=f"default {_DEFAULTS.min_size}")
    shapes = commands.add_parser("shapes", help="write the built-in shapes image-caption folder")
    shapes.add_argument("out", help="output folder (must be missing or empty)")
    shapes.add_argument("--num", type=int, default=2000, help="number of images (default 2000)")
    shapes.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    shapes.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes (default 0)")
    shapes.add_argument(
        "--held-out", action="extend", nargs="+", default=[], metavar="PAIR",
        help='(color, shape) pairs to keep out, e.g. --held-out "red circle" "blue square"',
    )
    shapes.add_argument(
        "--colors", action="extend", nargs="+", default=None, metavar="COLOR",
        help="draw only these colors, every shape and position, e.g. --colors cyan (default: the six default colors)",
    )
    for sub in (check, pack, shapes):
        sub.error = parser.error  # one line and exit 2 from the subcommands too
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in commands.choices:
        argv.insert(0, "check")  # python -m diffusion.data FOLDER
    return parser.parse_args(argv)


def check_folder(folder: str, missing_caption: str, min_size: int, buckets: DataConfig | None = None) -> None:
    from diffusion.data.folder import DataError, index_folder

    index = index_folder(folder, DataConfig(path=folder, missing_caption=missing_caption, min_size=min_size), strict=False)
    print(index.report())
    if not index.items:
        raise DataError(f"no usable image-caption pairs in {folder}")
    if buckets:
        from diffusion.data.buckets import assign, config_buckets, histogram

        sizes = config_buckets(buckets, vae_factor=8)
        print(histogram(assign([index.info[p].size for p, _ in index.items], sizes), sizes))


def pack_shards(folder: str, out: str, shard_size: int, missing_caption: str, min_size: int) -> None:
    from diffusion.data.shards import pack_folder

    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    index = pack_folder(folder, out, shard_size, DataConfig(path=folder, missing_caption=missing_caption, min_size=min_size))
    print(index.report())
    shards = -(-len(index.items) // shard_size)
    print(f"wrote {len(index.items)} samples in {shards} shards of up to {shard_size} to {out} "
          f"(train with data.path={out}, or data.path={out}/{{00000..{shards - 1:05d}}}.tar)")


def write_shapes(out: Path, num: int, size: int, seed: int, held_out: list[str], colors: list[str] | None = None) -> None:
    from diffusion.data.folder import DataError
    from diffusion.data.shapes import generate_folder, parse_pair, resolve_colors

    if num < 1 or size < 8:
        raise UsageError(f"need --num >= 1 and --size >= 8, got --num {num} --size {size}")
    try:
        resolve_colors(colors)
    except ValueError as e:
        raise UsageError(f"--colors: {e}") from None
    try:
        for pair in held_out:
            parse_pair(pair, colors)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not empty; choose a new folder")
    generate_folder(out, num, size, seed, held_out, colors)
    held = f", held out: {', '.join(held_out)}" if held_out else ""
    only = f", colors: {', '.join(resolve_colors(colors))}" if colors else ""
    print(f"wrote {num} images ({size}x{size}, seed {seed}{only}{held}) to {out}")


def run(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "pack":
        pack_shards(args.folder, args.out, args.shard_size, args.missing_caption, args.min_size)
    elif args.command == "check":
        buckets = None
        if args.buckets:
            if min(args.buckets, args.bucket_step) < 1:
                raise UsageError("--buckets and --bucket-step must be positive")
            buckets = DataConfig(resolution=args.buckets, buckets=True, bucket_step=args.bucket_step,
                                 bucket_min_side=args.bucket_min_side, bucket_max_side=args.bucket_max_side)
        check_folder(args.folder, args.missing_caption, args.min_size, buckets)
    else:
        write_shapes(Path(args.out), args.num, args.size, args.seed, args.held_out, args.colors)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
