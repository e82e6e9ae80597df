"""metrics.jsonl (one JSON line per log step), the trackers that mirror it, and the weights-over-steps plot.

Cost keys of every line (train/loop.Throughput):
- `tokens_per_s`: training throughput since the previous line, all processes together, counting non-padding tokens
  only. reweight: the tokens fed through u and w (the training batch through u, training and validation batch
  through w; the log says `train tok/s (u+w)`); finetune: the training batch's tokens (`train tok/s`).
- `sec_per_step`: wall-clock seconds per step so far in this process (its first step left out once a second is
  timed); the log line turns it into an ETA for the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scalebio_cli.files import atomic_path
from scalebio_cli.results.tracking import Trackers

if TYPE_CHECKING:
    from scalebio_cli.recipe.schema import Recipe


def _step(line: str) -> int | None:
    """The step of one metrics line, or None for a line a crash or a full disk tore (or anything else unreadable)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class MetricsLog:
    """Appends one JSON object per line; a resumed run drops lines past its restart step first.

    A run killed mid-write (SIGKILL, power loss, a full disk) can leave its last line cut short. Resuming drops
    such lines, says so, and goes on: they are at most one log step, rewritten when the run gets there again.

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
            lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            steps = [_step(ln) for ln in lines]
            kept = [ln for ln, step in zip(lines, steps) if step is not None and step <= start_step]
            torn = [i + 1 for i, step in enumerate(steps) if step is None]
            if torn:
                from rich.markup import escape

                from scalebio_cli.console import console

                console.print(f"[yellow]warning:[/] {escape(str(path))}: dropped {len(torn)} unreadable line(s) "
                              f"({', '.join(map(str, torn[:5]))}), cut short by the crash that stopped the run")
            with atomic_path(path) as tmp:  # a second crash now must not lose the lines kept
                tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")

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
