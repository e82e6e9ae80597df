"""`scalebio select`: the paper's per-record baselines, RHO-loss and LESS (ALGORITHM.md, "The paper's baselines").

Every kept record of data.sources gets a score for data.validation (selection/rho_loss.py, selection/less.py); the
N best over all sources are written as `sample` writes its draw (data/out/record_writer.py: each record unchanged plus
"source", shuffled with the seed, `--format`, .jsonl or .parquet, atomically) with OUT.manifest.json (method,
counts, seed, the method's settings, each selected record's score). The work that takes long (the irreducible-loss
model, the warm-up checkpoints, per-checkpoint gradient scores) is kept under select.work_dir and reused.

Under torchrun every process scores a shard of the pool (selection/pool.py `shard`), all gather every score, and
the main process alone writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from scalebio_cli.errors import InputError
from scalebio_cli.recipe import Recipe

METHODS = ("rho-loss", "less")
_STREAM = 0x5E1  # the output's shuffle


def check(recipe: Recipe, where: str | Path, method: str, num_samples: int, output: Path, fmt: str,
          force: bool, scores: Path | None = None) -> None:
    """Every problem of the inputs at once (exit 2), before torch loads: the method, the recipe's select section,
    sources and validation sets (each record parsed), the model folder, and the output."""
    from scalebio_cli.data.out.record_writer import output_problems
    from scalebio_cli.recipe.model_checks import model_folder_problems
    from scalebio_cli.recipe.preflight import model_files, output_file_problems, recipe_source_problems

    usage = []
    if method not in METHODS:
        usage.append(f"--method: must be one of {', '.join(METHODS)}, got {method!r}")
    if num_samples < 1:
        usage.append(f"--num-samples: must be >= 1, got {num_samples}")
    usage += output_problems(output, fmt, force)
    manifest = output.with_name(output.stem + ".manifest.json")
    # the ranges of select.less and select.rho_loss are declared in recipe/schema.py (refused as the recipe loads)
    problems = ([] if recipe.select.less.target_modules else
                ["select.less.target_modules: needs module names (e.g. [q_proj, v_proj])"])
    if not recipe.data.sources:
        problems.append("data.sources: select needs the sources to choose records from")
    if not recipe.data.validation:
        problems.append("data.validation: select needs a validation set (what the chosen records should serve)")
    sources, data_problems = recipe_source_problems(recipe, validation=True)
    problems += data_problems + model_folder_problems("model", recipe.model, need_tokenizer=not recipe.tokenizer)
    if recipe.tokenizer:
        problems += model_folder_problems("tokenizer", recipe.tokenizer, need_weights=False)
    inputs = {s.key: s.path for s in sources.values()} | model_files(recipe.model)
    inputs |= {f"the validation set {n}": s.path for n, s in recipe.validation_sets().items()}
    usage += output_file_problems("--output", output, inputs)
    usage += output_file_problems("--output (its manifest)", manifest, inputs)
    if scores is not None:
        if not scores.name.endswith(".jsonl"):
            usage.append(f"--scores {scores}: must end in .jsonl (one JSON line per pool record)")
        elif scores.exists() and not scores.is_dir() and not force:
            usage.append(f"--scores {scores}: already exists; pass --force to replace it")
        if scores in (output, manifest):
            usage.append(f"--scores {scores}: is the selection's own output; name another file")
        usage += output_file_problems("--scores", scores, inputs)
    if usage or problems:
        raise InputError(usage + [f"{where}: {p}" for p in problems])


def top_n(scores: dict[str, np.ndarray], num_samples: int) -> list[tuple[str, int, float]]:
    """The `num_samples` highest-scoring (source, example, score) over all sources; ties: source order, then
    example order. Non-finite scores rank last."""
    names = list(scores)
    which = np.concatenate([np.full(len(scores[n]), k) for k, n in enumerate(names)] or [np.zeros(0, int)])
    index = np.concatenate([np.arange(len(scores[n])) for n in names] or [np.zeros(0, int)])
    value = np.concatenate([scores[n] for n in names] or [np.zeros(0)])
    ranked = np.where(np.isfinite(value), value, -np.inf)
    order = np.lexsort((index, which, -ranked))[:num_samples]
    return [(names[which[j]], int(index[j]), float(value[j])) for j in order]


def write_scores(path: Path, scores: dict[str, np.ndarray], record_index: dict[str, np.ndarray]) -> None:
    """Every scored record's score, one JSON line each: `{"source": NAME, "index": RECORD, "score": S}` (RECORD: its
    position in the source file, as `sample --rank-by` and the manifest count; S null where not finite). Written
    a line at a time (a pool of millions would otherwise hold every line at once), atomically."""
    from scalebio_cli.files import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for n, values in scores.items():
            for i, v in zip(record_index[n].tolist(), values.tolist()):
                f.write(json.dumps({"source": n, "index": int(i), "score": v if math.isfinite(v) else None}) + "\n")


def _data_checks(recipe: Recipe, dist: Any) -> None:
    """The data checks every stage runs first (data/checks.py), the main process logging: duplicates, records shared
    between sources, copies of validation records. A source holding validation records scores high for holding
    them (both methods score against data.validation), so the log names it; select scores every record."""
    from scalebio_cli.data import stage_checks
    from scalebio_cli.data.read.expand import recipe_sources, validation_sources
    from scalebio_cli.train import distributed

    references = {s.key: s for s in validation_sources(recipe).values()}
    stage_checks.before_training(recipe, recipe_sources(recipe), references,
                                 is_main=dist.is_main, barrier=lambda: distributed.barrier(dist), keeps_all="select")


def _score(recipe: Recipe, method: str, num_samples: int, seed: int) -> tuple[Any, dict[str, np.ndarray],
                                                                                 dict[str, Any], Any]:
    from rich.markup import escape

    from scalebio_cli.console import console
    from scalebio_cli.selection import less, rho_loss
    from scalebio_cli.selection.pool import load_pool
    from scalebio_cli.train import distributed

    dist = distributed.setup()
    _data_checks(recipe, dist)
    pool = load_pool(recipe, dist)
    if num_samples > pool.size:
        raise InputError(f"--num-samples: {num_samples:,} asked for, but the sources keep only {pool.size:,} "
                         f"records with a response token within data.max_length={recipe.data.max_length}")
    work = Path(recipe.select.work_dir or Path(recipe.output_dir) / "select")
    console.print(f"[dim]select[/] {method}: {num_samples:,} of {pool.size:,} records for "
                  f"{', '.join(pool.validation)}; work folder {escape(str(work))}"
                  + (f"; {dist.world_size} processes score a shard each" if dist.distributed else ""))
    if method == "rho-loss":
        scores, settings = rho_loss.scores(recipe, pool, dist, seed, work)
    else:
        scores, settings = less.scores(recipe, pool, dist, seed, work)
    return pool, scores, settings, dist


def run(recipe: Recipe, method: str, num_samples: int, output: Path, seed: int, fmt: str,
        scores_out: Path | None = None) -> dict[str, Any] | None:
    """Score (each process a shard of the pool under torchrun), keep the top N, write OUT and OUT.manifest.json (and
    `scores_out`) from the main process; returns the manifest there, None elsewhere."""
    import time

    from scalebio_cli.train import distributed, process

    start = time.perf_counter()  # the manifest's `seconds`: what the selection cost (compare reports it)
    pool, scores, settings, dist = _score(recipe, method, num_samples, seed)
    try:
        if not process.is_main():  # every process holds every score; one writes
            return None
        return _write(recipe, method, num_samples, output, seed, fmt, scores_out, pool, scores, settings, start)
    finally:
        # every process leaves together: one that tore gloo down while the writer still ran aborted at exit
        # ("terminate called without an active exception", seen once in CI)
        distributed.barrier(dist)
        distributed.teardown()


def _write(recipe: Recipe, method: str, num_samples: int, output: Path, seed: int, fmt: str,
           scores_out: Path | None, pool: Any, scores: dict[str, np.ndarray], settings: dict[str, Any],
           start: float) -> dict[str, Any]:
    import time

    from rich.markup import escape

    from scalebio_cli.console import console
    from scalebio_cli.data.out.record_writer import Chosen, write_records
    from scalebio_cli.data.read.expand import recipe_sources
    from scalebio_cli.files import write_json

    picked = top_n(scores, num_samples)
    positions = np.random.default_rng([seed, _STREAM]).permutation(num_samples)
    sources = recipe_sources(recipe)
    chosen = []
    for name, data in pool.sources.items():
        mine = [(j, i) for j, (n, i, _) in enumerate(picked) if n == name]
        records = np.array([int(data.record_index[i]) for _, i in mine], dtype=np.int64)
        chosen.append(Chosen(name, sources[name], records, positions[[j for j, _ in mine]].astype(np.int64)))
    write_records(chosen, num_samples, output, fmt)
    if scores_out is not None:
        write_scores(scores_out, scores, {n: d.record_index for n, d in pool.sources.items()})
    counts = {name: sum(1 for n, _, _ in picked if n == name) for name in pool.sources}
    selected = sorted(({"position": int(positions[j]), "source": n, "index": int(pool.sources[n].record_index[i]),
                        "score": s} for j, (n, i, s) in enumerate(picked)), key=lambda r: r["position"])
    manifest = {"method": method, "num_samples": num_samples, "counts": counts, "seed": seed, "settings": settings,
                "sources": {n: s.path for n, s in sources.items()}, "scored": {n: len(d) for n, d in
                                                                              pool.sources.items()},
                "mean_score": {n: float(np.mean(v)) if len(v) else None for n, v in scores.items()},
                "output": str(output), "format": fmt, "scores_file": str(scores_out) if scores_out else None,
                "seconds": round(time.perf_counter() - start, 1), "selected": selected}
    write_json(output.with_name(output.stem + ".manifest.json"), manifest)
    console.print(f"[bold green]selected[/] {', '.join(f'{n} {c:,}' for n, c in counts.items())} -> "
                  f"{escape(str(output))}")
    return manifest
