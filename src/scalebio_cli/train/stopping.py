"""Stopping a run early on purpose: on SIGTERM/SIGINT (after a checkpoint), or at the first non-finite value."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from scalebio_cli.errors import TrainingStopped


class StopSignals:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then it checkpoints and stops).

    A second SIGINT interrupts at once, as users expect from a second Ctrl-C.
    """

    def __init__(self) -> None:
        self.received: str | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = self.received is None
        self.received = signal.Signals(signum).name
        if first:
            announce(self.received)

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle SIGTERM/SIGINT while in the block. Nested in another StopSignals' block (a stage that `compare`
        runs), a signal received here is passed outward when the block ends: a stage that finished anyway (the
        signal came during its last step) must not swallow the stop its caller is waiting for."""
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            outer = getattr(previous[signal.SIGTERM], "__self__", None)
            if self.received and isinstance(outer, StopSignals) and outer.received is None:
                outer.received = self.received


def announce(name: str) -> None:
    """Said at once (a step can take a minute): the signal was heard, and what happens next. From the first process
    only (under torchrun every process gets the signal)."""
    if os.environ.get("RANK", "0") != "0":
        return
    from scalebio_cli.console import console

    again = "; Ctrl-C again stops at once, without a checkpoint" if name == "SIGINT" else ""
    console.print(f"[bold yellow]{name} received:[/] stopping after this step (a checkpoint is written first, then "
                  f"the run exits; continue it with --resume auto){again}")


class FiniteGuard:
    """Remembers, on the device, the first step whose watched values were not all finite.

    `observe` costs no host-device synchronisation; `check` (at log and checkpoint steps) does, and raises.
    So a checkpoint is never written after a non-finite step, and the last good one survives.
    """

    def __init__(self, labels: list[str], device: torch.device):
        self.labels = labels
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.values = torch.zeros(len(labels), dtype=torch.float32, device=device)

    def observe(self, step: int, values: torch.Tensor) -> None:
        newly_bad = (~torch.isfinite(values).all()) & (self.first_bad < 0)
        self.first_bad = torch.where(newly_bad, step, self.first_bad)
        self.values = torch.where(newly_bad, values.float(), self.values)

    def check(self) -> None:
        step = int(self.first_bad.item())
        if step >= 0:
            shown = ", ".join(f"{label} {value:.6g}" for label, value in zip(self.labels, self.values.tolist()))
            raise TrainingStopped(f"non-finite values at step {step}: {shown}")


class StopVote:
    """Agrees across processes on when to stop, without stalling the GPU.

    Every step's vote (processes that received a signal, summed by the step's all-reduce) is copied to the host
    without blocking and read one step later, by which time the next step is already queued: every process
    decides at the same step, and the device never waits for the host. In one process the signal flag is read
    directly.
    """

    def __init__(self, signals: StopSignals, distributed: bool):
        self.signals, self.distributed = signals, distributed
        self.pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def __call__(self, votes: torch.Tensor) -> bool:
        """Record this step's `votes`; True if the previous step's votes asked to stop."""
        if not self.distributed:
            return self.signals.received is not None
        previous = self.pending
        on_gpu = votes.device.type == "cuda"
        host = votes.detach().to("cpu", non_blocking=on_gpu)
        event = torch.cuda.Event() if on_gpu else None
        if event is not None:
            event.record()
        self.pending = (host, event)
        if previous is None:
            return False
        if previous[1] is not None:
            previous[1].synchronize()  # that step finished long ago; the current one keeps the GPU busy
        return bool(previous[0].item() > 0)
