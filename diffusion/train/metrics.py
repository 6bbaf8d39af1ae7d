"""metrics.jsonl: one JSON line per logged step, and TensorBoard through Accelerate when it is set up."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLogger:
    """One JSON line per log call in output_dir/metrics.jsonl, and TensorBoard through Accelerate when set up.

    Only the main process writes. Each line has the stage, the step and the wall time.
    """

    def __init__(self, path: Path, accelerator, trackers: bool = False):
        self.path, self.accelerator, self.trackers = path, accelerator, trackers

    def log(self, stage: str, step: int, **values: float) -> None:
        if not self.accelerator.is_main_process:
            return
        # A non-finite value (a skipped step) is written as null: NaN is not JSON.
        values = {k: (float(v) if math.isfinite(v) else None) if isinstance(v, (int, float)) else v for k, v in values.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": stage, "step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self.trackers:
            self.accelerator.log({f"{stage}/{k}": v for k, v in values.items() if isinstance(v, float)}, step=step)

    def truncate(self, stage: str, after_step: int) -> None:
        """Drop this stage's lines past `after_step`: a resumed run logs those steps again."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        keep = [ln for ln in lines if not _is_after(ln, stage, after_step)]
        if len(keep) != len(lines):
            self.path.write_text("".join(ln + "\n" for ln in keep))


def _is_after(line: str, stage: str, step: int) -> bool:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return True  # half a line from a killed run
    return entry.get("stage") == stage and entry.get("step", 0) > step
