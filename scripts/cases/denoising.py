"""A denoising case with a known right answer, for tests and benchmarks of `select`: three sources holding the same
kind of records, `clean` (answered correctly), `dot` (every answer replaced by ".") and `shuffled` (each answer
belongs to another record's question), and a validation set drawn like `clean`. A selection asked for a third of
the pool should take mostly `clean`. `write_task_case`: a case told apart by the task instead, for a model that
knows nothing yet. `write_alpaca_case`: the paper's alpaca denoising case from real records (GPT4-LLM-Cleaned:
Alpaca prompts, GPT-4 answers), the shuffled source with each answer's own words shuffled.

Kept out of the package (scripts/cases/): tests add scripts/ to sys.path, scripts run from it."""

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
    return _write(out, {"clean": clean, "dot": dot, "shuffled": shuffled, "val": val})


def _write(out: Path, records: dict[str, list[dict[str, Any]]]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in records.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return paths


def tiny_pairs(seed: int = 0) -> Callable[[int], list[QA]]:
    """Arithmetic and word-list reversal questions, mixed (the tiny demo's two tasks): a shuffled answer mostly
    answers the other task, which a tiny model can tell without learning arithmetic."""
    from scalebio_cli.tiny import arithmetic_qa, reverse_qa

    rng = random.Random(seed)
    return lambda n: [(arithmetic_qa if rng.random() < 0.5 else reverse_qa)(rng) for _ in range(n)]


def write_task_case(out: Path, per_source: int, num_val: int, seed: int = 0) -> dict[str, Path]:
    """A case a randomly initialised model's gradients can tell apart: sources `arith` (arithmetic, answered),
    `reverse` (word-list reversal, answered) and `dot` (arithmetic questions, "." answers); validation: answered
    arithmetic. Asked for a third of the pool, a selection should take `arith`. Writes arith/reverse/dot/val
    .jsonl; returns their paths."""
    from scalebio_cli.tiny import arithmetic_qa, reverse_qa

    rng = random.Random(seed)
    records = {"arith": [message(*arithmetic_qa(rng)) for _ in range(per_source)],
               "reverse": [message(*reverse_qa(rng)) for _ in range(per_source)],
               "dot": [message(arithmetic_qa(rng)[0], ".") for _ in range(per_source)],
               "val": [message(*arithmetic_qa(rng)) for _ in range(num_val)]}
    return _write(out, records)


def alpaca_records(path: Path, max_prompt: int = 160, max_response: int = 180) -> list[QA]:
    """(prompt, answer) pairs of a sharegpt-style JSON file's short two-turn records (answers 30+ characters)."""
    records = json.loads(path.read_text(encoding="utf-8"))
    return [(r["items"][0]["value"], r["items"][1]["value"]) for r in records
            if len(r.get("items", [])) == 2 and len(r["items"][0]["value"]) <= max_prompt
            and 30 <= len(r["items"][1]["value"]) <= max_response]


def write_alpaca_case(out: Path, path: Path, per_source: int, num_val: int, seed: int = 0) -> dict[str, Path]:
    """clean / dot / shuffled (words of each answer shuffled) / val from disjoint records of `path`, drawn with
    `seed`. Writes .jsonl files; returns their paths."""
    rng = random.Random(seed)
    pairs = alpaca_records(path)
    need = 3 * per_source + num_val
    if len(pairs) < need:
        raise SystemExit(f"{path}: {len(pairs):,} short records, {need:,} needed; lower per_source or num_val")
    rng.shuffle(pairs)
    it = iter(pairs)

    def take(n: int) -> list[QA]:
        return [next(it) for _ in range(n)]

    val, clean, dot, noisy = take(num_val), take(per_source), take(per_source), take(per_source)

    def shuffled(answer: str) -> str:
        words = answer.split()
        rng.shuffle(words)
        return " ".join(words)

    return _write(out, {"clean": [message(q, a) for q, a in clean], "dot": [message(q, ".") for q, _ in dot],
                        "shuffled": [message(q, shuffled(a)) for q, a in noisy],
                        "val": [message(q, a) for q, a in val]})
