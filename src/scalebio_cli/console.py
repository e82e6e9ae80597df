"""Where humans read: rich output on stderr (stdout is kept for results that pipes consume)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, highlight=False)


def format_weights(weights: dict[str, float], width: int = 0) -> str:
    """`clean 0.52 · noisy 0.21 · ...` (names shortened to `width` characters when width > 0)."""
    def short(name: str) -> str:
        return name if width <= 0 or len(name) <= width else name[: width - 1] + "…"

    return " · ".join(f"{escape(short(k))} {v:.3f}" for k, v in weights.items())
