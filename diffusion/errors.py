"""How problems reach the user: one line that says what to fix, and an exit status that says whose move it is.

Every entry point (train.py, sample.py, app.py, `python -m diffusion.*`) maps these through
`diffusion.cli.run_main`: a `UsageError` (bad command line or config) exits with 2, any other
`ToolkitError` (a problem met while doing the work: data, weights, a model folder, a diverging loss)
exits with 1. Library code raises them and never exits itself.
"""

from __future__ import annotations

import sys


class ToolkitError(Exception):
    """A problem the user can fix; str(error) is the one-line message."""

    exit_code = 1


class UsageError(ToolkitError):
    """A bad command line or config: nothing was done."""

    exit_code = 2


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class TrainError(ToolkitError, RuntimeError):
    """A training run that cannot go on."""
