"""Convert a model between our model folders, diffusers folders and Stable Diffusion single files.

    python -m diffusion.convert SRC DST --to diffusers|single-file|native [--prediction-type epsilon|v_prediction] [--ema auto|on|off]
                                [--merge-lora FILE[:SCALE] ...]

SRC is any model the toolkit reads; DST must not exist (it is never overwritten), and a single file is
named .safetensors. --prediction-type and --ema are for an SD single file, which may not record them.
--merge-lora bakes LoRA adapters into the written weights (summed in fp64, as sample.py --lora merges
them), and the model's "trained on" note names them.
Exit status 0: written; 1: SRC unreadable, DST already there, or a model the format cannot hold; 2: a bad
command line.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable, Sequence

from .cli import ArgumentParser, add_single_file_args, run_main
from .errors import UsageError


def _writers() -> dict[str, Callable]:
    """format -> writer(pipe, dst); imported on use, as torch is."""
    from .io.sd_export import write_diffusers_folder, write_single_file

    return {"diffusers": write_diffusers_folder, "single-file": write_single_file, "native": lambda pipe, dst: pipe.save(dst)}


def parse_args(argv: Sequence[str] | None):
    parser = ArgumentParser(prog="python -m diffusion.convert", description="Convert a model to another format.")
    parser.add_argument("src", metavar="SRC", help="our model folder, a diffusers folder, or an SD .safetensors file")
    parser.add_argument("dst", metavar="DST", help="where to write it: a new folder, or a new .safetensors file for --to single-file")
    parser.add_argument("--to", required=True, choices=["diffusers", "single-file", "native"], help="the format to write")
    add_single_file_args(parser)
    parser.add_argument("--merge-lora", action="append", metavar="FILE[:SCALE]",
                        help="bake this LoRA into the written model with this multiplier (default 1); repeat to stack")
    return parser.parse_args(argv)


def convert(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from .io.sd_export import check_destination
    from .lora.merge import describe, resolve_stack
    from .pipeline import load_pipeline

    src, dst = Path(args.src), Path(args.dst)
    check_destination(dst, single_file=args.to == "single-file")  # before the minutes a large model takes to load
    stack = resolve_stack(args.merge_lora)  # and a missing adapter file too
    if args.ema != "auto" and not src.is_file():
        raise UsageError(f"--ema chooses among a single file's weights; {src} is a folder, which holds one set")
    pipe = load_pipeline(src, device="cpu", prediction_type=args.prediction_type, ema=args.ema)
    stored = pipe.cfg.schedule.prediction_type
    if args.prediction_type and args.prediction_type != stored:  # our folders record it; the flag cannot change it
        raise UsageError(f"{src} says prediction_type {stored!r}, but {args.prediction_type!r} was asked for; drop the flag")
    if stack:
        bake_loras(pipe, stack)
        print(describe(pipe, stack), file=sys.stderr)
    _writers()[args.to](pipe, dst)
    print(f"wrote {dst} ({args.to})")


def bake_loras(pipe, stack) -> None:
    """Merge the adapters into pipe's weights for good, and note them in its info (the images' model name stays)."""
    pipe.set_loras(stack)
    pipe.lora_base.clear()  # the merged weights are the model now; nothing restores the old ones
    baked = ", ".join(f"LoRA {a.name} ×{a.multiplier:g} ({a.hash})" for a in pipe.loras)
    pipe.loras = []  # images from the written model do not carry the tags: the adapters are in its weights
    info = pipe.cfg.info
    trained_on = f"{info.trained_on}; merged {baked}" if info.trained_on else f"merged {baked}"
    pipe.cfg = dataclasses.replace(pipe.cfg, info=dataclasses.replace(info, trained_on=trained_on))


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(convert, argv)


if __name__ == "__main__":
    sys.exit(main())
