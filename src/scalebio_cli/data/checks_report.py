"""The data checks in the log: leaks first (a source holding validation or test records, red), sources smaller
than what a run draws from them, then duplicates and records shared between sources.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scalebio_cli.data.near_copies import NEAR_JACCARD


@dataclass(frozen=True)
class Draws:
    """What a run draws from each source: `per_step[NAME]` records a step (on average) over `steps` steps."""

    stage: str
    steps: int
    per_step: dict[str, float]


def reweight_draws(steps: int, batch_size: int, composition: str, sizes: dict[str, int]) -> Draws:
    """reweight's draws: batch_size a step, split evenly over the sources (`balanced`) or by their sizes
    (`pooled`)."""
    total = sum(sizes.values()) or 1
    share = {n: (1 / len(sizes) if composition == "balanced" else size / total) for n, size in sizes.items()}
    return Draws("reweight", steps, {n: batch_size * s for n, s in share.items()})


Report = Callable[[str, str], None]  # (level: info | warning | leak, markup-safe text)


def print_report(level: str, text: str) -> None:
    """The log's lines: overlap with a validation or test set in red (it decides what the weights measure)."""
    from scalebio_cli.console import console

    style = {"info": "[dim]checks[/]", "warning": "[bold yellow]warning:[/]",
             "leak": "[bold red]warning: validation data in a source:[/]"}[level]
    console.print(f"{style} {text}")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def findings(checks: Any, draws: Draws | None) -> list[tuple[str, str]]:
    """The log's lines about the checks (data/checks.DataChecks), `(level, markup-safe text)`: leaks first."""
    leaks, warnings, infos = [], [], []
    for name, c in checks.by_source.items():
        for ref, (exact, near) in c.overlap_by_set.items():
            fix = ("dropped (data.decontaminate: true)" if checks.decontaminate
                   else f"{checks.keeps_all} uses every record; remove them from the source (reweight drops them "
                   "with data.decontaminate: true)" if checks.keeps_all
                   else "set data.decontaminate: true to drop them")
            held = " and ".join(([f"{exact:,} records of {ref} verbatim"] if exact else [])
                                + ([f"{near:,} near copies of its records (word 3-gram Jaccard >= {NEAR_JACCARD})"]
                                   if near else []))
            leaks.append(f"source '{name}' holds {held}: a method that lowers the loss on {ref} favours '{name}' "
                         f"for holding them, not for its quality; {fix}")
        usable = c.records - c.dropped
        drawn = draws.per_step.get(name, 0.0) * draws.steps if draws is not None else 0.0
        if draws is not None and usable < drawn:
            warnings.append(f"source '{name}' has {usable:,} records, fewer than the ~{drawn:,.0f} {draws.stage} "
                            f"draws from it ({draws.steps:,} steps x {draws.per_step[name]:.3g} a step): each record "
                            f"is seen ~{drawn / max(usable, 1):.1f} times, so its loss tells how well it is "
                            "memorised more than what it teaches; add records or merge it with a like source")
        parts = ([f"{c.duplicates:,} of {c.records:,} records repeat another of the source"] if c.duplicates else [])
        parts += [f"{n:,} records also in '{other}'" for other, n in c.shared_with.items()]
        if parts:
            infos.append(f"{name}: {'; '.join(parts)}")
    if not leaks and not infos:
        refs = ", ".join(checks.references) or "no validation set"
        infos.append(f"no duplicates, no record shared between sources, none of {refs} in a source")
    return [("leak", _escape(t)) for t in leaks] + [("warning", _escape(t)) for t in warnings] + \
        [("info", _escape(t)) for t in infos]
