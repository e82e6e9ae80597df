"""Where humans read: rich output on stderr (stdout is kept for results that pipes consume)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

# soft_wrap: a message stays one line however narrow the terminal (or 80 columns when piped), so logs can be grepped
console = Console(stderr=True, highlight=False, soft_wrap=True)


def format_weights(weights: dict[str, float], width: int = 0) -> str:
    """`clean 0.52 · noisy 0.21 · ...` (names shortened to `width` characters when width > 0)."""
    def short(name: str) -> str:
        return name if width <= 0 or len(name) <= width else name[: width - 1] + "…"

    return " · ".join(f"{escape(short(k))} {v:.3f}" for k, v in weights.items())


def step_progress(label: str, enabled: bool = True, transient: bool = False) -> Progress:
    """A progress bar for `label` with a free-text `info` field (current weights, loss) after it.

    The info field gets what is left of the line and is cut with an ellipsis: left to rich, a long field squeezes
    every column (`200/2…  0:0…`), which is what a log file or an 80-column CI console would show.
    """
    def fixed() -> Column:
        return Column(no_wrap=True)

    info_width = max(12, console.width - 64)  # 64: label, bar, "12345/12345", two times, separators
    return Progress(
        TextColumn(f"[bold]{label}", table_column=fixed()), BarColumn(bar_width=20, table_column=fixed()),
        MofNCompleteColumn(table_column=fixed()), TimeElapsedColumn(table_column=fixed()),
        TextColumn("<", table_column=fixed()), TimeRemainingColumn(table_column=fixed()),
        TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=info_width)),
        console=console, disable=not enabled, transient=transient,
    )


def format_evidence(evidence: dict[str, dict]) -> str:
    """The log's evidence lines: per source its mean advantage, standard error and z, and what |z| < 2 means."""
    lines = ["[bold]evidence[/] (advantage of w over u on a source, vs the mixture; z = advantage / stderr)"]
    for name, e in evidence.items():
        if e["z"] is None or e["stderr"] is None or e["advantage"] is None:
            verdict, numbers = "too few lam steps to tell", f"{e['steps']} lam steps"
        else:
            z = e["z"]
            verdict = "cannot tell it from the mixture" if abs(z) < 2 else ("raised" if z > 0 else "lowered")
            numbers = f"{e['advantage']:+.2e} ± {e['stderr']:.1e}  z {z:+6.2f}  ({e['steps']} lam steps)"
        lines.append(f"  {escape(name)}: {numbers}  [dim]{verdict}[/]")
    return "\n".join(lines)
