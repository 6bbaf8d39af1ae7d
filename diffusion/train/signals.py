"""Stopping cleanly on SIGINT or SIGTERM: the loop saves a checkpoint and exits at the end of the step."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Optional

STOP_ENV = "DIFFUSION_STOP_AT"  # tests: "<stage>:<step>" acts like SIGTERM after that step


class StopRequest:
    """Set by SIGINT or SIGTERM while installed: the loop then saves a checkpoint and exits at the step's end.

    A second SIGINT kills as usual. $DIFFUSION_STOP_AT="<stage>:<step>" requests the same stop after
    that step, for tests that need an interruption at a known point.
    """

    def __init__(self):
        self.signal: Optional[str] = None
        self._previous: dict[int, object] = {}
        stage, _, step = os.environ.get(STOP_ENV, "").partition(":")
        self._at = (stage, int(step)) if step.isdigit() else None

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
        print(f"\n{self.signal} received: saving a checkpoint after this step, then exiting", file=sys.stderr)

    @contextlib.contextmanager
    def installed(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def requested(self, stage: str, step: int) -> bool:
        if self._at == (stage, step):
            self.signal = STOP_ENV
        return self.signal is not None
