"""The pieces every training loop shares: the run's folder and recipe.yaml, resuming, and what happens after a
step (a periodic checkpoint, or a checkpoint and a clean stop on SIGTERM/SIGINT). Plain functions and one small
class, so reweight and finetune read as setup, loop, finish."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from scalebio_cli.console import console, format_duration, step_progress
from scalebio_cli.data.read.sources import DataSource
from scalebio_cli.data.tokens.render import Renderer
from scalebio_cli.data.tokens.tokenized import load_all
from scalebio_cli.errors import TrainingStopped
from scalebio_cli.files import write_text
from scalebio_cli.recipe import Recipe, dump_recipe
from scalebio_cli.recipe.schema import result_keys
from scalebio_cli.results import run_folder
from scalebio_cli.train import checkpoint, distributed
from scalebio_cli.train.distributed import DistInfo
from scalebio_cli.train.stopping import FiniteGuard, StopSignals, StopVote


def open_run_folder(recipe: Recipe, dist: DistInfo) -> Path:
    """Create output_dir (only now: bad inputs leave nothing behind) and record the resolved recipe there."""
    out = Path(recipe.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        run_folder.clear_finished(out)  # the folder holds a finished run again only when this one finishes
        write_text(out / "recipe.yaml", dump_recipe(recipe))
    return out


def load_data_files(files: list[tuple[str, DataSource | str]], renderer: Renderer, recipe: Recipe,
                    dist: DistInfo, lazy_min_records: int | None = None) -> list[Any]:
    """Tokenize (or read from the cache) each `(recipe key, path)`, logging sizes and warning about truncation;
    sources of `lazy_min_records` records or more are tokenized as drawn (tokenized.load_all)."""
    bar = step_progress("tokenize", dist.is_main, transient=True)  # shown only while a large source is tokenized

    def start(key: str, total: int | None) -> Callable[[int], None]:
        task = bar.add_task("tokenize", total=total, info=escape(key))
        done = 0

        def advance(records: int) -> None:
            nonlocal done
            done += records
            if total is not None and done >= total:
                bar.remove_task(task)  # its log line follows
            else:
                bar.advance(task, records)
        return advance

    with bar:
        return load_all(files, renderer, recipe.data.cache_dir, is_main=dist.is_main,
                        barrier=lambda: distributed.barrier(dist),
                        log=lambda line: console.print(f"[dim]data[/] {line}"),
                        warn=lambda line: console.print(f"[bold yellow]warning:[/] {line}"),
                        lazy_min_records=lazy_min_records, seed=recipe.seed, progress=start)


def check_resume(start_from: Path | None, stage: str, recipe: Recipe, fingerprints: dict[str, str], force: bool,
                 dist: DistInfo) -> None:
    """Refuse to continue a checkpoint whose result-changing keys or data differ (unless --force, then warn)."""
    if start_from is None:
        return
    accepted = checkpoint.check_resumable(start_from, stage, recipe.to_dict(), fingerprints, result_keys(stage),
                                          force)
    if accepted and dist.is_main:
        console.print(f"[yellow]resuming despite differences (--force):[/] {escape('; '.join(accepted))}")


def announce_resume(start_from: Path, step: int, total: int, dist: DistInfo) -> None:
    if dist.is_main:
        console.print(f"[bold]resumed[/] from {escape(str(start_from))} (step {step} of {total})")


@dataclass
class StepControl:
    """After each step: checkpoint every `every` steps, and on a signal checkpoint and stop (every process at the
    same step: the vote rides the step's all-reduce). Never after a non-finite step (the guard is checked first)."""

    stage: str
    recipe: Recipe
    out: Path
    total: int
    dist: DistInfo
    fingerprints: dict[str, str]
    guard: FiniteGuard
    signals: StopSignals = field(default_factory=StopSignals)
    vote: StopVote = field(init=False)

    def __post_init__(self) -> None:
        self.vote = StopVote(self.signals, self.dist.distributed)

    @property
    def stop_requested(self) -> bool:
        return self.signals.received is not None

    def after_step(self, done: int, votes: torch.Tensor, write: Callable[[Path], None]) -> None:
        stop = self.vote(votes)
        every = self.recipe.checkpoint.every
        periodic = every and done % every == 0
        if not (stop or periodic) or done >= self.total:  # after the last step, finishing beats checkpointing
            return
        self.guard.check()
        meta: dict[str, Any] = {"stage": self.stage, "config": self.recipe.to_dict(),
                                "data_sha256": self.fingerprints}
        path = checkpoint.save(self.out, done, meta, self.recipe.checkpoint.keep, self.dist, write)
        if stop:
            raise TrainingStopped(f"stopped by {self.signals.received or 'a signal on another process'} after step "
                                  f"{done} of {self.total}; checkpoint saved to {path}; continue with --resume auto",
                                  signal=self.signals.received)


class Throughput:
    """What a run costs as it goes: tokens per second since the previous log line, seconds per step, and the ETA.

    `unit` names what the tokens are, for the log line (`train tok/s (u+w)`: reweight's non-padding tokens fed
    through u and w; `train tok/s`: finetune's non-padding training tokens). Seconds per step leave out the first
    step of this process (allocation, warm-up, compilation) once a second one is timed, so the ETA after a few steps
    is already the run's. Times are host times: callers read them at steps that synchronise with the device (log
    steps), so queued GPU work is counted. Used by every loop (reweight, finetune; later select, compare).
    """

    EARLY_STEP = 3  # steps after the start at which a first line with s/step and the ETA is printed

    def __init__(self, start: int = 0, total: int = 0, unit: str = "tok/s") -> None:
        self.start, self.total, self.unit = start, total, unit
        self.tokens, self.since = 0, time.perf_counter()
        self.began = self.since
        self.first_done: float | None = None  # when this process's first step ended
        self.done = start

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def step(self, done: int) -> None:
        """Step `done` (1-based) has been taken."""
        self.done = done
        if self.first_done is None:
            self.first_done = time.perf_counter()

    def rate(self) -> float:
        """Tokens per second since the previous call (or the start)."""
        now = time.perf_counter()
        rate = self.tokens / max(now - self.since, 1e-9)
        self.tokens, self.since = 0, now
        return rate

    def sec_per_step(self) -> float | None:
        """Seconds per step so far (the first step left out once there is a second), or None before a step."""
        taken = self.done - self.start
        if taken <= 0 or self.first_done is None:
            return None
        now = time.perf_counter()
        if taken == 1:
            return now - self.began
        return (now - self.first_done) / (taken - 1)

    def eta(self) -> float | None:
        """Seconds left to the run's last step, or None before a step."""
        per_step = self.sec_per_step()
        return None if per_step is None else per_step * max(0, self.total - self.done)

    def early(self, done: int, log_every: int) -> bool:
        """Whether step `done` gets the early line: EARLY_STEP steps in, when no log line falls there or before."""
        return done == self.start + self.EARLY_STEP and done < self.total \
            and not any(d % log_every == 0 for d in range(self.start + 1, done + 1))

    def pace(self) -> str:
        """`1.23 s/step · ETA 4m05s` (empty before a step)."""
        per_step, eta = self.sec_per_step(), self.eta()
        if per_step is None or eta is None:
            return ""
        return f"{self.short()} · ETA {format_duration(eta)}"

    def short(self) -> str:
        """`1.23 s/step` for the progress bar (which shows the ETA in its own column); empty before a step."""
        per_step = self.sec_per_step()
        return "" if per_step is None else f"{per_step:.2f} s/step" if per_step < 10 else f"{per_step:,.0f} s/step"

    def first_steps(self, tokens_per_s: float) -> str:
        """The early line: `first steps: 1.23 s/step · ETA 4m05s for 200 steps · 5,120 train tok/s (u+w)`."""
        return (f"first {self.done - self.start} steps: {self.pace()} for steps {self.start + 1}-{self.total} · "
                f"{tokens_per_s:,.0f} {self.unit}")


def tau_scale(cfg: Any, step: int) -> float:
    """tau^-i in round i (i = step // tau_every): the reference divides every learning rate (u's, w's and lam's)
    by tau each round as alpha grows by tau, so the steps of the penalised objective keep their size. 1 when
    tau = 1 (every shipped script of the reference)."""
    return float(cfg.tau) ** -(step // cfg.tau_every)


def scale_schedule(engine: Any, scale: Callable[[int], float]) -> None:
    """Multiply an engine's learning-rate schedule (train/optim.LrSchedule: a pure function of the step, so a
    resumed run gets the same rates) by `scale(step)`."""
    factor = engine.schedule.factor
    engine.schedule.factor = lambda step: factor(step) * scale(step)


def set_clip(engine: Any, threshold: float) -> None:
    """Set the gradient-norm clipping threshold of a model copy for the coming step (reweight: max_grad_norm x the
    alpha in force). Our AdamW engines hold it themselves, LoRA adapters under DeepSpeed in their shared pair; a
    whole model under DeepSpeed in its ZeRO optimizer (`clip_grad`) and its config."""
    if hasattr(engine, "max_grad_norm"):
        engine.max_grad_norm = threshold
    elif hasattr(getattr(engine, "adapters", None), "max_grad_norm"):
        engine.adapters.max_grad_norm = threshold
    elif hasattr(engine, "ds"):
        if hasattr(engine.ds.optimizer, "clip_grad"):
            engine.ds.optimizer.clip_grad = threshold
        engine.ds._config.gradient_clipping = threshold
