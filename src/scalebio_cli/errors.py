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
    """A run stopped before its last step on purpose (a signal, non-finite values): exit status 1, no traceback;
    130 when the signal was SIGINT (Ctrl-C), as shells expect of an interrupted command."""

    def __init__(self, message: str, signal: str | None = None):
        super().__init__(message)
        self.signal = signal

    @property
    def exit_code(self) -> int:
        return 130 if self.signal == "SIGINT" else 1


def json_error(exc: ValueError) -> str:
    """`Expecting ',' delimiter at line 3 column 7` for a JSONDecodeError, without the doubled `at at` of messages
    that end in `at` (`Unterminated string starting at`, `Invalid control character at`)."""
    msg, lineno, colno = getattr(exc, "msg", None), getattr(exc, "lineno", None), getattr(exc, "colno", None)
    if msg is None or colno is None:
        return str(exc)
    where = f"line {lineno} column {colno}" if lineno and lineno > 1 else f"column {colno}"
    return f"{msg} {where}" if msg.rstrip().endswith(" at") else f"{msg} at {where}"
