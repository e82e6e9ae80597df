"""A denoising case with a known right answer, for tests and benchmarks of `select`: three sources holding the same
kind of records, `clean` (answered correctly), `dot` (every answer replaced by ".") and `shuffled` (each answer
belongs to another record's question), and a validation set drawn like `clean`. A selection asked for a third of
the pool should take mostly `clean`."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

QA = tuple[str, str]


def message(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_case(out: Path, pairs: Callable[[int], list[QA]], per_source: int, num_val: int,
               seed: int = 0) -> dict[str, Path]:
    """`pairs(n)`: n fresh (question, answer) pairs. Writes clean/dot/shuffled/val .jsonl; returns their paths."""
    rng = random.Random(seed)
    clean = [message(q, a) for q, a in pairs(per_source)]
    dot = [message(q, ".") for q, _ in pairs(per_source)]
    noisy = pairs(per_source)
    answers = [a for _, a in noisy]
    rng.shuffle(answers)
    shuffled = [message(q, a) for (q, _), a in zip(noisy, answers)]
    val = [message(q, a) for q, a in pairs(num_val)]
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in (("clean", clean), ("dot", dot), ("shuffled", shuffled), ("val", val)):
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return paths


def tiny_pairs(seed: int = 0) -> Callable[[int], list[QA]]:
    """Arithmetic and word-list reversal questions, mixed (the tiny demo's two tasks): a shuffled answer mostly
    answers the other task, which a tiny model can tell without learning arithmetic."""
    from scalebio_cli.tiny import arithmetic_qa, reverse_qa

    rng = random.Random(seed)
    return lambda n: [(arithmetic_qa if rng.random() < 0.5 else reverse_qa)(rng) for _ in range(n)]
