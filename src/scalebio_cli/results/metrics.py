"""metrics.jsonl (one JSON line per log step), the trackers that mirror it, and the weights-over-steps plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scalebio_cli.files import atomic_path
from scalebio_cli.results.tracking import Trackers

if TYPE_CHECKING:
    from scalebio_cli.recipe.schema import Recipe


class MetricsLog:
    """Appends one JSON object per line; a resumed run drops lines past its restart step first.

    With a `recipe` whose `report_to` names trackers, every line also goes to them (results/tracking.py): the one
    place reweight and finetune write metrics, so both stages get tracking without knowing of it.
    """

    def __init__(self, path: Path, start_step: int = 0, recipe: Recipe | None = None):
        self.path = path
        names = list(recipe.report_to) if recipe is not None else []
        self.trackers = Trackers(names, path.parent, start_step, recipe.to_dict() if names and recipe else None)
        if start_step == 0:
            path.write_text("")
        elif path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.trackers.log(record)


def plot_weights(trajectory: list[dict[str, Any]], path: Path, title: str = "ScaleBiO source weights") -> None:
    """One line per source: its sampling weight over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(trajectory[0]["weights"])
    steps = [p["step"] for p in trajectory]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name in names:
        ax.plot(steps, [p["weights"][name] for p in trajectory], label=name, linewidth=1.8)
    ax.axhline(1 / len(names), color="grey", linestyle=":", linewidth=1, label="uniform")
    ax.set_xlabel("step")
    ax.set_ylabel("sampling weight")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
