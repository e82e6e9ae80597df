"""Experiment trackers (recipe key `report_to`): every metrics line also goes to TensorBoard and/or W&B.

metrics.jsonl stays the record of a run; trackers are views of it, fed by MetricsLog (results/metrics.py) on the
main process only. A metrics line holds numbers and per-source mappings (`weights`, `loss_u`, `loss_w`,
`lambda_grad`); each number becomes one scalar, each mapping one scalar per source under `KEY/SOURCE`, and
TensorBoard gets a layout that draws each mapping as one multi-line chart. The losses per training source and per
validation set take the names trainers' dashboards use (TAGS): `train/loss/SOURCE`, `val/loss/NAME`. The client
libraries are imported only when a tracker is asked for (pip install 'scalebio-cli[tracking]').
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from scalebio_cli.recipe.schema import TRACKERS

# metrics.jsonl key -> tracker name of its per-source / per-set values (finetune's `train_loss_by_source` and
# `val_loss` mappings, reweight's `val_loss/NAME` numbers)
TAGS = {"train_loss_by_source": "train/loss", "val_loss": "val/loss"}


def tag(key: str) -> str:
    """The tracker name of a flattened metrics key: `val_loss/gsm` -> `val/loss/gsm`; other keys unchanged."""
    head, sep, tail = key.partition("/")
    return f"{TAGS[head]}/{tail}" if sep and head in TAGS else key


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """`{"L1": 1.1, "weights": {"a": 0.5}}` -> `{"L1": 1.1, "weights/a": 0.5}`; non-numbers are left out."""
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)

    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            for name, inner in value.items():
                put(f"{key}/{name}", inner)
        else:
            put(key, value)
    return out


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float], groups: dict[str, list[str]]) -> None: ...


class TensorBoardTracker:
    """Event files under OUTPUT_DIR/tensorboard/, flushed at every line (a run may be killed at any time)."""

    def __init__(self, log_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run first hides the events its checkpoint had not reached
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.layout_done = False

    def log(self, step: int, values: dict[str, float], groups: dict[str, list[str]]) -> None:
        if not self.layout_done and groups:
            # Custom Scalars: one chart per mapping with a line per source (all in this one event file, unlike
            # add_scalars, which writes one run folder per source)
            charts = {key: ["Multiline", [f"^{key}/"]] for key in groups}
            self.writer.add_custom_scalars({"per source": charts})
            self.layout_done = True
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()


class WandbTracker:
    """A W&B run named after the output folder; `WANDB_MODE=offline` keeps it on disk (wandb's own variable)."""

    def __init__(self, out_dir: Path, config: dict[str, Any] | None, resume: bool):
        import wandb

        os.environ.setdefault("WANDB_DIR", str(out_dir))
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "scalebio"), name=out_dir.name,
                              config=config, dir=str(out_dir), resume="allow" if resume else None,
                              id=_wandb_id(out_dir, resume))
        # wandb finishes at exit by itself, printing its summary on stdout, which carries only the result path
        # (`W=$(scalebio reweight ...)`); finishing first, with stdout sent to stderr, keeps the pipe clean.
        atexit.register(self._finish)

    def _finish(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.run.finish()

    def log(self, step: int, values: dict[str, float], groups: dict[str, list[str]]) -> None:
        self.run.log(values, step=step)


def _wandb_id(out_dir: Path, resume: bool) -> str:
    """The run's W&B id, kept in OUTPUT_DIR/wandb_id: a resumed run continues its W&B run, a fresh one starts anew."""
    import secrets

    path = out_dir / "wandb_id"
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(8)
    path.write_text(run_id + "\n")
    return run_id


class Trackers:
    """The trackers a recipe asked for; `log` sends one metrics line to all of them."""

    def __init__(self, names: list[str], out_dir: Path, start_step: int = 0, config: dict[str, Any] | None = None):
        self.trackers: list[Tracker] = []
        for name in names:
            if name not in TRACKERS:  # recipe/load.py refuses unknown names; a caller passing one is a bug
                raise ValueError(f"unknown tracker {name!r}")
            if name == "tensorboard":
                purge = start_step + 1 if start_step else None
                self.trackers.append(TensorBoardTracker(out_dir / "tensorboard", purge))
            else:
                self.trackers.append(WandbTracker(out_dir, config, resume=start_step > 0))

    def log(self, record: dict[str, Any]) -> None:
        if not self.trackers:
            return
        values = {tag(key): value for key, value in scalars(record).items()}
        groups: dict[str, list[str]] = {}  # one chart per mapping: `train/loss` holds `train/loss/SOURCE`
        for key in values:
            head, sep, tail = key.rpartition("/")
            if sep:
                groups.setdefault(head, []).append(tail)
        for tracker in self.trackers:
            tracker.log(int(record["step"]), values, groups)
