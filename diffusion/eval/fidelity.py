"""Prompt fidelity of a pipeline on the built-in shapes task: generate each prompt, classify the pixels.

`python -m diffusion.eval shapes --model DIR` prints it; training logs it every training.eval_every steps.
"""

from __future__ import annotations

from typing import Sequence

from ..data.shapes import all_prompts, parse_caption, parse_pair
from ..pipeline import Pipeline
from .shapes import score


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
