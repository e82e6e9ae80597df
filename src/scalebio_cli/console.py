"""Where humans read: rich output on stderr (stdout is kept for results that pipes consume)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

HEARTBEAT_SECONDS = 30.0  # when stderr is not a terminal, a line at least this often while work goes on


class _Console(Console):
    """rich's Console, remembering when it last printed (a heartbeat stays quiet while the log speaks)."""

    last_print = 0.0

    def print(self, *args: Any, **kwargs: Any) -> None:
        self.last_print = time.monotonic()
        super().print(*args, **kwargs)


# soft_wrap: a message stays one line however narrow the terminal (or 80 columns when piped), so logs can be grepped
console = _Console(stderr=True, highlight=False, soft_wrap=True)


def format_duration(seconds: float) -> str:
    """`45s`, `12m05s`, `3h07m`: an ETA as a person reads it (the log's and the progress bar's)."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def time_left(task: Task) -> float | None:
    """Seconds left to a task's end: from its `pace` field (a function giving seconds per step, the estimate the
    loop's log lines use: loop.Throughput.sec_per_step) when it has one, else rich's own estimate."""
    pace = task.fields.get("pace")
    per_step = pace() if callable(pace) else None
    if per_step is not None and task.total is not None:
        return per_step * max(0.0, task.total - task.completed)
    return task.time_remaining


class EtaColumn(ProgressColumn):
    """The time left as the log writes it (`4m05s`), from the same estimate (`time_left`)."""

    def render(self, task: Task) -> Text:
        left = None if task.finished else time_left(task)
        return Text("-" if left is None else format_duration(left), style="progress.remaining")


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
    return SpeakingProgress(
        TextColumn(f"[bold]{label}", table_column=fixed()), BarColumn(bar_width=20, table_column=fixed()),
        MofNCompleteColumn(table_column=fixed()), TimeElapsedColumn(table_column=fixed()),
        TextColumn("<", table_column=fixed()), EtaColumn(table_column=fixed()),
        TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=info_width)),
        console=console, disable=not enabled, transient=transient,
    )


class Heartbeat:
    """A line every HEARTBEAT_SECONDS while work goes on and nothing else was printed, when stderr is not a
    terminal (a log file, CI, `2> log`): there no progress bar is drawn, and a long silence reads as a hang.
    `status()` gives the line. A daemon thread: it never keeps the process alive."""

    def __init__(self, status: Callable[[], str]):
        self.status = status
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if console.is_terminal or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="scalebio-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        interval, began = HEARTBEAT_SECONDS, time.monotonic()
        while not self._stop.wait(min(interval, 1.0)):
            if time.monotonic() - max(console.last_print, began) >= interval:
                line = self.status()
                if line:
                    console.print(f"[dim]{line}[/]")
                else:
                    began = time.monotonic()  # nothing to say (no task under way): wait a whole interval again


@contextmanager
def heartbeat(what: str) -> Iterator[None]:
    """`what: still working (2m30s)` every HEARTBEAT_SECONDS of silence in the block, when stderr is not a terminal:
    for work without a progress bar (select's scoring passes, compare's cells, group's clustering)."""
    began = time.monotonic()
    beat = Heartbeat(lambda: f"{escape(what)}: still working ({format_duration(time.monotonic() - began)})")
    beat.start()
    try:
        yield
    finally:
        beat.stop()


class SpeakingProgress(Progress):
    """A Progress that, where no bar can be drawn (stderr not a terminal), says where each task stands every
    HEARTBEAT_SECONDS of silence: `score 1,234/10,000 · 2m05s elapsed · ETA 5m10s · info`."""

    def __init__(self, *columns: Any, **kwargs: Any):
        super().__init__(*columns, **kwargs)
        self.heartbeat = Heartbeat(self.status)

    def status(self) -> str:
        lines = []
        with self._lock:  # the loop adds and updates tasks meanwhile
            tasks = list(self._tasks.values())
        for task in tasks:
            if not task.visible or task.finished:
                continue
            total = f"/{task.total:,.0f}" if task.total is not None else ""
            left = time_left(task)
            eta = f" · ETA {format_duration(left)}" if left is not None else ""
            info = task.fields.get("info") or ""
            lines.append(f"{task.description} {task.completed:,.0f}{total} · {format_duration(task.elapsed or 0)} "
                         f"elapsed{eta}" + (f" · {info}" if info else ""))
        return "\n".join(lines)

    def start(self) -> None:
        super().start()
        if not self.disable:
            self.heartbeat.start()

    def stop(self) -> None:
        self.heartbeat.stop()
        super().stop()


def format_evidence(evidence: dict[str, dict], level: float | None = None, tested: int | None = None) -> str:
    """The log's evidence lines: per source its mean advantage, standard error, z and, where the file has them
    (CONTRACT v4), the contrast with the rest of the mixture, its t, the Holm-adjusted p and the verdict at `level`
    (weights.json `evidence_level`); `tested`: the number of sources the p values were adjusted for (a placebo
    adds one), default those shown."""
    at = f"verdict from t at p < {level:g}, " if level is not None else ""
    lines = ["[bold]evidence[/] (advantage of w over u on a source, vs the whole mixture: z = advantage / stderr; "
             f"vs the rest: the same against the other sources; {at}p two-sided, adjusted for "
             f"{tested or len(evidence)} sources)"]
    for name, e in evidence.items():
        if e["z"] is None or e["stderr"] is None or e["advantage"] is None:
            numbers = f"{e['steps']} lam steps: too few to estimate the error"
        else:
            numbers = f"{e['advantage']:+.2e} ± {e['stderr']:.1e}  z {e['z']:+6.2f}"
            if isinstance(e.get("t"), (int, float)) and isinstance(e.get("contrast"), (int, float)):
                numbers += f"  vs the rest {e['contrast']:+.2e}  t {e['t']:+6.2f}"
            numbers += f"  ({e['steps']} lam steps)"
        if "verdict" in e:
            p = e.get("p")
            verdict = f"{e['verdict']}" + (f" (p {p:.2g})" if isinstance(p, (int, float)) else "")
        else:  # a file of an earlier version: z alone
            z = e["z"]
            verdict = ("too few lam steps to tell" if z is None else "cannot tell it from the mixture" if abs(z) < 2
                       else "raised" if z > 0 else "lowered")
        lines.append(f"  {escape(name)}: {numbers}  [dim]{escape(verdict)}[/]")
    return "\n".join(lines)
