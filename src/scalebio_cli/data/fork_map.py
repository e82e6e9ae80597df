"""An ordered map over forked worker processes: how a full pass over a large source uses every core.

Parsing, rendering, tokenizing and hashing records are pure CPU work per chunk of records, so they scale with the
cores. This process only reads the chunks (a plain `.jsonl` file: its lines, unparsed) and hands them out in order;
results come back in the same order, so a parallel pass gives what a serial one gives by construction. Workers are
forked (Linux): they inherit what the task needs (a loaded tokenizer, the reference sets' hashes) instead of
building it again, and the task itself is never pickled (it may be a closure).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 8
PARALLEL_MIN_RECORDS = 20_000  # below this a pool's start-up (~0.1 s per forked worker) is not worth it
_END = object()  # the end of the items (an item may be None)
_task: Callable[[Any], Any] | None = None  # set in the parent just before forking; each worker inherits it


def _call(item: Any) -> Any:
    assert _task is not None
    return _task(item)


def default_workers() -> int:
    """One worker per core this process may use (the parent only reads), at most MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def ordered_map(task: Callable[[T], R], items: Iterable[T], workers: int = 1) -> Iterator[R]:
    """`task(item)` for each item, in order; `workers` > 1 forks that many processes (where fork exists). An error
    reading the items is raised after the results of the items read before it, as in a serial pass: the error
    reported is the first bad item's."""
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(task, items)
        return
    global _task
    _task = task
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            # A bounded window: a few items in flight per worker keep every worker busy while the parent reads,
            # without queueing a whole large source in memory (Pool.imap would).
            pending: deque[Any] = deque()
            reading = iter(items)
            while True:
                try:
                    item = next(reading, _END)
                except Exception:
                    while pending:
                        yield pending.popleft().get()
                    raise
                if item is _END:
                    break
                pending.append(pool.apply_async(_call, (item,)))
                if len(pending) >= 3 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        _task = None
