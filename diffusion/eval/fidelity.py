"""Prompt fidelity of a pipeline on the built-in shapes task: generate each prompt, classify the pixels.

`python -m diffusion.eval shapes --model DIR` prints it; training logs it every training.eval_every steps.
"""

from __future__ import annotations

from typing import Sequence

from ..data.shapes import COLORS, all_prompts, parse_caption, parse_pair
from ..pipeline import Pipeline
from .shapes import score


# A fixed third of the 90 prompts for scoring during training: every color, shape and position appears
# (each position 6 times), and image i keeps seed i so that the figures of successive evaluations compare.
TRAINING_PROMPTS = all_prompts()[::3]


def shapes_prompts(colors: Sequence[str] | None = None, repeats: int = 1) -> list[str]:
    """The prompts of `colors` (None: the 90 default ones), the whole list `repeats` times over.

    evaluate_shapes gives image i seed i, so each repeat draws every prompt again with new seeds: one
    color's 15 prompts with repeats=6 are scored on 90 images, as many as the default set.
    ValueError names the valid colors.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    return all_prompts(colors) * repeats


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
    # The model may have been trained on any palette colors, so its pairs are read against all of them.
    held_out = {parse_pair(p, tuple(COLORS)) for p in pipe.cfg.info.held_out}
    if held_out:
        unseen = [parse_caption(p)[:2] in held_out for p in prompts]
        for name, keep in (("seen", False), ("held_out", True)):
            picked = [i for i, u in enumerate(unseen) if u == keep]
            result[name] = score([images[i] for i in picked], [prompts[i] for i in picked])
    return result
