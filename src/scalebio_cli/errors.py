"""The two exceptions the CLI reports without a traceback: bad input (exit 2) and a deliberate early stop (exit 1)."""

from __future__ import annotations


class InputError(Exception):
    """Bad usage, recipe, or input data.

    The CLI prints every problem on stderr without a traceback and exits with status 2. Collect all the problems
    you can find before raising, so users fix everything in one round.
    """

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class TrainingStopped(Exception):
    """A run stopped before its last step on purpose (a signal, non-finite values): exit status 1, no traceback."""
