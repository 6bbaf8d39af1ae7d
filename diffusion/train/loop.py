"""The training loop that both stages share: resume, step, log, checkpoint, preview, stop and the final sync.

A `Stage` supplies its models, its loss (`forward_backward`), what it saves, previews and exports; the
loop does everything else, in the same order for both:

    run_loop -> resume
             -> each step: forward_backward -> agree -> check_finite -> optimize -> log_step
                           -> evaluate (when due) -> save_checkpoint + preview (when due, or stopping)
             -> finish: weights in sync on every rank, then the stage's export
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..config import Config
from ..data import FolderIndex
from ..errors import TrainError
from .checkpoints import latest_checkpoint, list_checkpoints, restore_training_state, save_training_state, write_checkpoint
from .distributed import agree, check_in_sync, check_same, debug_record, gather_rng
from .metrics import MetricsLogger
from .order import ShardedOrder, batch_stream
from .signals import StopRequest


@dataclass
class Run:
    """What both stages share."""

    cfg: Config
    out: Path
    accelerator: Accelerator
    index: FolderIndex
    resume: bool
    logger: MetricsLogger
    stop: StopRequest
    channels_last: bool = True  # the trained modules' layout (training.channels_last)

    def layout(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module in the run's memory layout (models are built channels_last)."""
        if not self.channels_last:
            module.to(memory_format=torch.contiguous_format)
        return module

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, message: str) -> None:
        if self.main:
            tqdm.write(message, file=sys.stderr)


class Stage:
    """One training stage, as the loop sees it. Subclasses set these attributes in __init__."""

    name: str  # "vae" or "ldm": the metrics' stage and the progress bar's label
    title: str  # "VAE" or "LDM", for messages
    checkpoints: Path  # where its checkpoints go
    max_steps: int
    checkpoint_every: int
    images_per_step: int  # over all ranks and micro-batches, for images/s
    params: list[torch.nn.Parameter]  # clipped to grad_clip before each update
    grad_clip: float
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # this rank's noise, timesteps and augmentation
    order: ShardedOrder

    def load(self, epoch: int, batches: list[list[int]]) -> Iterable[dict]:
        """An epoch's index batches -> batches (see batch_stream)."""
        raise NotImplementedError

    def forward_backward(self, stream: Iterator, step: int) -> tuple[torch.Tensor, tuple[int, int], list[int]]:
        """Read step `step`'s batches (0-based) and backpropagate the loss; returns (loss, data position, indices read)."""
        raise NotImplementedError

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer whose state a checkpoint keeps."""
        return [self.optimizer]

    def after_update(self, step: int) -> None:
        """After an update with a finite loss (the EMA, a discriminator's step)."""

    def log_values(self, step: int) -> dict[str, float]:
        """Stage-specific values for each metrics line."""
        return {}

    def evaluate(self, step: int) -> Optional[dict[str, str]]:
        """Scores for the progress bar when one is due at this step (main process only), else None."""
        return None

    def restore(self, weights: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
        """Load the weights of a checkpoint ({file stem: state dict})."""
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        """Write the weights into a checkpoint folder."""
        raise NotImplementedError

    def preview(self, step: int) -> None:
        """After each checkpoint, on the main process: samples or reconstructions."""

    def synced(self) -> dict[str, tuple[object, str]]:
        """{field: (module or state dict, name)} that every rank must hold identically at the end."""
        raise NotImplementedError

    def export(self, step: int) -> None:
        """On the main process, after the last step: write the stage's result."""
        raise NotImplementedError


def run_loop(run: Run, stage: Stage) -> bool:
    """Train `stage` to its max_steps; False when a signal stopped it (after saving a checkpoint)."""
    step, position = resume(run, stage)
    stream = batch_stream(stage.order, position, stage.load)
    meter = Throughput(step, stage.images_per_step)
    postfix: dict[str, str] = {}
    bar = tqdm(total=stage.max_steps, initial=step, desc=stage.name, disable=not run.main, dynamic_ncols=True)
    with bar, run.stop.installed():
        while step < stage.max_steps:
            loss, position, indices = stage.forward_backward(stream, step)
            debug_record(run.accelerator, stage=stage.name, step=step + 1, indices=indices)
            # All ranks agree to stop on a non-finite loss (before anything is saved) or on a signal.
            loss_value, stop = agree(run.accelerator, loss, run.stop.requested(stage.name, step + 1))
            check_finite(run, stage, step + 1, loss_value)
            optimize(run, stage, step, math.isfinite(loss_value))
            step += 1
            if run.main and (scores := meter.excluding(stage.evaluate, step)) is not None:
                postfix = scores
            log_step(run, stage, bar, meter, step, loss_value, postfix)
            if step % stage.checkpoint_every == 0 or step == stage.max_steps or stop:
                save_checkpoint(run, stage, step, position)
            if stop:
                run.say(f"stopped by {run.stop.signal} at {stage.name} step {step}; checkpoint saved, continue with --resume")
                return False
    finish(run, stage, step)
    return True


def resume(run: Run, stage: Stage) -> tuple[int, tuple[int, int]]:
    """(step, data position) to start from: the newest valid checkpoint's with --resume, else (0, (0, 0))."""
    step, position = 0, (0, 0)
    found = latest_checkpoint(stage.checkpoints, run.say) if run.resume else None
    if found:
        path, weights, state = found
        stage.restore(weights, path)
        step, position = restore_training_state(state, run.accelerator, stage.optimizers, stage.scheduler, stage.generator)
        run.logger.truncate(stage.name, step)
        run.say(f"resuming the {stage.title} stage from {path}")
    elif run.resume:
        run.say(f"no checkpoint in {stage.checkpoints}; the {stage.title} stage starts from step 0")
    check_same(run.accelerator, step, "processes resume from different steps; output_dir must be on a filesystem they all share")
    return step, position


def check_finite(run: Run, stage: Stage, step: int, loss: float) -> None:
    """Stop on a non-finite loss before anything is saved, or (training.on_nonfinite: skip) drop the update."""
    if math.isfinite(loss):
        return
    for opt in stage.optimizers:
        opt.zero_grad(set_to_none=True)
    if run.cfg.training.on_nonfinite == "skip":
        run.say(f"warning: non-finite loss ({loss}) at {stage.name} step {step}; update skipped (training.on_nonfinite: skip)")
        return
    last = list_checkpoints(stage.checkpoints)
    where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was saved yet"
    raise TrainError(
        f"non-finite loss ({loss}) at {stage.name} step {step}; stopped without saving, {where} "
        "(--resume continues from it; lower the lr, or set training.on_nonfinite=skip)"
    )


def optimize(run: Run, stage: Stage, step: int, finite: bool) -> None:
    """Clip and apply the update (skipped for a non-finite loss); the LR schedule advances either way."""
    if finite:
        run.accelerator.clip_grad_norm_(stage.params, stage.grad_clip)
        stage.optimizer.step()
        stage.after_update(step)
    stage.scheduler.step()
    stage.optimizer.zero_grad(set_to_none=True)


class Throughput:
    """Training images per second since the last logged step, leaving out time spent evaluating."""

    def __init__(self, step: int, images_per_step: int):
        self.images_per_step = images_per_step
        self.reset(step)

    def reset(self, step: int) -> None:
        self.tick, self.ticked = time.perf_counter(), step

    def images_per_s(self, step: int) -> float:
        return (step - self.ticked) * self.images_per_step / (time.perf_counter() - self.tick)

    def excluding(self, fn, *args):
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.tick += time.perf_counter() - started


def log_step(run: Run, stage: Stage, bar: tqdm, meter: Throughput, step: int, loss: float, postfix: dict) -> None:
    lr = stage.scheduler.get_last_lr()[0]
    images_s = meter.images_per_s(step)
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_s:.1f}", **postfix)
    if step % run.cfg.training.log_every == 0 or step == stage.max_steps:
        run.logger.log(stage.name, step, loss=loss, lr=lr, images_per_s=images_s, **stage.log_values(step))
        meter.reset(step)


def save_checkpoint(run: Run, stage: Stage, step: int, position: tuple[int, int]) -> None:
    rng = gather_rng(run.accelerator, stage.generator)  # a collective: every rank takes part
    if not run.main:
        return
    with write_checkpoint(stage.checkpoints, step, run.cfg.training.keep_checkpoints) as tmp:
        stage.save(tmp)
        save_training_state(tmp / "state.pt", step, position, run.accelerator, stage.optimizers, stage.scheduler, rng)
    stage.preview(step)


def finish(run: Run, stage: Stage, step: int) -> None:
    """Check that every rank ends with the same weights, export on the main process, then wait for it."""
    hashes = {field: check_in_sync(run.accelerator, weights, what) for field, (weights, what) in stage.synced().items()}
    debug_record(run.accelerator, stage=stage.name, **hashes)
    if run.main:
        stage.export(step)
    run.accelerator.wait_for_everyone()  # the next stage reads what this one exported
