"""Evaluate a trained model on the built-in shapes task.

    python -m diffusion.eval shapes --model runs/shapes/model [--sampler ddim|ddpm] [--steps N]

It generates one image for each of the 90 color x shape x position prompts (seeds 0-89, the model's
default sampler settings unless overridden), classifies each with the pixel evaluator, and prints
per-attribute accuracy as JSON. Pairs the model never saw in training are also scored on their own.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch

from .data.evaluate import score
from .data.shapes import all_prompts, parse_caption, parse_pair
from .pipeline import Pipeline, PipelineError, load_pipeline


# A fixed third of the 90 prompts for scoring during training: every color, shape and position appears
# (each position 6 times), and image i keeps seed i so that the figures of successive evaluations compare.
TRAINING_PROMPTS = all_prompts()[::3]


def evaluate_shapes(pipe: Pipeline, sampler: str | None = None, steps: int | None = None,
                    guidance: float | None = None, batch_size: int = 30, progress=None,
                    prompts: Sequence[str] | None = None) -> dict:
    """Accuracy of `pipe` on the shapes prompts (all 90 unless given), with the pairs the model never saw
    in training ("held_out") and the others ("seen") also scored on their own when there are any."""
    prompts = list(prompts or all_prompts())
    images = pipe.generate(prompts, sampler=sampler, steps=steps, guidance=guidance, seed=0,
                           batch_size=batch_size, progress=progress)
    d = pipe.cfg.sampling
    result = {
        "sampler": sampler or d.sampler,
        "steps": steps or d.steps,
        "guidance": d.guidance if guidance is None else guidance,
        **score(images, prompts),
    }
    held_out = {parse_pair(p) for p in pipe.cfg.info.held_out}
    if held_out:
        unseen = [parse_caption(p)[:2] in held_out for p in prompts]
        for name, keep in (("seen", False), ("held_out", True)):
            picked = [i for i, u in enumerate(unseen) if u == keep]
            result[name] = score([images[i] for i in picked], [prompts[i] for i in picked])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion.eval", description=__doc__.split("\n")[1])
    parser.add_argument("task", choices=["shapes"], help="the evaluation task")
    parser.add_argument("--model", required=True, help="a model folder exported by train.py")
    parser.add_argument("--sampler", choices=["ddim", "ddpm"], default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    args = parser.parse_args(argv)
    try:
        pipe = load_pipeline(args.model, device=args.device)
        with torch.inference_mode():
            result = evaluate_shapes(pipe, args.sampler, args.steps, args.guidance, args.batch_size)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
