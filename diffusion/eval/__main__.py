"""Score models and images on the built-in shapes task.

    python -m diffusion.eval shapes --model runs/shapes/model [--sampler ddim|ddpm] [--steps N] [--guidance G]
                                    [--colors cyan ...] [--repeats N] [--lora FILE[:SCALE] ...]
    python -m diffusion.eval folder FOLDER      # score an image-caption folder, e.g. saved samples

`shapes` generates one image for each of the 90 color x shape x position prompts (seeds 0-89, the
model's default sampler settings unless overridden), classifies each with the pixel evaluator, and
prints per-attribute accuracy as JSON. Pairs the model never saw in training are also scored on their own.
`--colors` scores only the prompts of those colors (15 each); `--repeats N` draws the prompt list N times
over with successive seeds, e.g. `--colors cyan --repeats 6` scores 90 cyan images. `--lora` (repeatable)
merges adapters into the model before scoring; the JSON lists them under "loras".
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from ..cli import ArgumentParser, add_lora_args, add_model_args, run_main
from ..errors import UsageError


def parse_args(argv: Sequence[str] | None):
    parser = ArgumentParser(prog="python -m diffusion.eval", description="Score models and images on the shapes task.")
    tasks = parser.add_subparsers(dest="task", required=True)
    shapes = tasks.add_parser("shapes", help="generate the shapes prompts (the 90 default ones unless --colors) with a model and score them")
    add_model_args(shapes)
    shapes.add_argument("--sampler", default=None, help='e.g. "DPM++ 2M Karras" or dpmpp_2m_karras (default: the model\'s)')
    shapes.add_argument("--steps", type=int, default=None)
    shapes.add_argument("--guidance", type=float, default=None)
    shapes.add_argument("--batch-size", type=int, default=30)
    shapes.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when present")
    shapes.add_argument(
        "--colors", action="extend", nargs="+", default=None, metavar="COLOR",
        help="score only the prompts of these colors, e.g. --colors cyan (default: the six default colors)",
    )
    shapes.add_argument("--repeats", type=int, default=1, metavar="N", help="draw every prompt N times, seeds continuing (default 1)")
    add_lora_args(shapes, dirs=False)
    folder = tasks.add_parser("folder", help="score an image-caption folder of shapes images")
    folder.add_argument("folder")
    for sub in (shapes, folder):
        sub.error = parser.error  # one line and exit 2 from the subcommands too
    return parser.parse_args(argv)


def evaluate(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.task == "folder":
        score_folder(args.folder)
        return
    import torch

    from ..cli import load_model
    from ..lora.merge import describe, resolve_stack
    from .fidelity import evaluate_shapes

    if not args.model:
        raise UsageError("shapes needs --model")
    prompts = select_prompts(args.colors, args.repeats)  # before loading: a typo costs no model load
    stack = resolve_stack(args.lora)
    pipe = load_model(args.model, device=args.device, prediction_type=args.prediction_type, ema=args.ema)
    pipe.set_loras(stack)
    if stack:
        print(describe(pipe, stack), file=sys.stderr)
    with torch.inference_mode():
        result = evaluate_shapes(pipe, args.sampler, args.steps, args.guidance, args.batch_size, prompts=prompts)
    result["loras"] = [{"name": a.name, "multiplier": a.multiplier, "hash": a.hash} for a in pipe.loras]
    print(json.dumps(result, indent=2))


def select_prompts(colors: Sequence[str] | None, repeats: int) -> list[str]:
    """The prompts that --colors and --repeats ask for; a bad value is a one-line UsageError."""
    from .fidelity import shapes_prompts

    if repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {repeats}")
    try:
        return shapes_prompts(colors, repeats)
    except ValueError as e:
        raise UsageError(f"--colors: {e}") from None


def score_folder(folder: str) -> None:
    # Imported here: the folder loader pulls in torch, which the evaluator does not need.
    from ..config import DataConfig
    from ..data.folder import DataError, index_folder, load_image
    from .shapes import format_score, score

    index = index_folder(folder, DataConfig(path=folder, missing_caption="skip"))
    images = [load_image(path) for path, _ in index.items]
    try:
        print(format_score(score(images, [caps[0] for _, caps in index.items])))
    except ValueError as e:  # a caption that is not a shapes prompt
        raise DataError(f"{folder}: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
