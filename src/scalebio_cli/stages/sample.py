"""`scalebio sample`: draw N records from the sources in proportion to their weights.

Counts are exact (largest-remainder rounding, so they add up to N). The records are streamed (data/out/record_writer.py,
which `select` shares): each source file is read once and only the chosen records are parsed, and memory holds two
integer arrays of length N, never whole files.
`fmt="messages"` writes every record in one schema (`{"messages": [...], "source": NAME}`, data/out/normalize.py); an
output ending in `.parquet` is written as JSON lines first and converted in batches (data/out/parquet_out.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scalebio_cli.data.out.mixture import largest_remainder
from scalebio_cli.data.out.record_writer import FORMATS, Chosen, write_records
from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.data.read.sources import DataSource
from scalebio_cli.errors import InputError
from scalebio_cli.files import write_json

_STREAM = 0x5A3  # separates sample's random streams from reweight's under the same seed
__all__ = ["FORMATS", "largest_remainder"]  # re-exported: the CLI and tests read them here


def load_scores(path: Path, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """A `select --scores` file as one array per source of `sizes`, indexed by record (NaN: not scored). Every
    problem is an InputError naming the file and line."""
    where = f"--rank-by {path}"
    if not path.is_file():
        raise InputError(f"{where}: no such file (write one with `scalebio select ... --scores FILE`)")
    out = {n: np.full(size, np.nan) for n, size in sizes.items()}
    seen: dict[str, set[int]] = {n: set() for n in sizes}
    problems, other = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where} line {number}: not JSON ({e.msg})")
            continue
        name, index, score = (row.get(k) for k in ("source", "index", "score")) if isinstance(row, dict) else (
            None, None, None)
        if not isinstance(name, str) or not isinstance(index, int) or isinstance(index, bool) or not (
                score is None or (isinstance(score, (int, float)) and not isinstance(score, bool))):
            problems.append(f'{where} line {number}: expected {{"source": NAME, "index": RECORD, "score": NUMBER}}')
        elif name not in sizes:
            other.add(name)
        elif not 0 <= index < sizes[name]:
            problems.append(f"{where} line {number}: source '{name}' has {sizes[name]:,} records, no record {index}")
        elif index in seen[name]:
            problems.append(f"{where} line {number}: source '{name}' record {index} is scored twice")
        else:
            seen[name].add(index)
            out[name][index] = np.nan if score is None else float(score)
        if len(problems) >= 10:
            break
    missing = [n for n in sizes if not seen[n]]
    if missing and not problems:
        problems.append(f"{where}: no scores for source(s) {', '.join(missing)}"
                        + (f" (it scores {', '.join(sorted(other))})" if other else "")
                        + "; score the same sources (select with the recipe whose sources you sample)")
    if problems:
        raise InputError(problems)
    return out


def ranked_picks(scores: np.ndarray, n: int) -> np.ndarray:
    """The n best-scored records (highest first; ties and unscored records: lower index first, unscored last);
    beyond the source's size (--replacement) the ranking starts over, so no record repeats before all have come."""
    ranked = np.where(np.isfinite(scores), scores, -np.inf)
    order = np.lexsort((np.arange(len(scores)), ~np.isfinite(scores), -ranked))
    return np.resize(order, n) if n else np.zeros(0, dtype=np.int64)


def repeats(picks: np.ndarray) -> dict[str, float] | None:
    """How much a source's draws repeat records: None when they do not."""
    distinct = len(np.unique(picks))
    if distinct == len(picks):
        return None
    return {"draws": len(picks), "distinct": distinct, "draws_per_record": round(len(picks) / distinct, 3)}


def _note_repeats(found: dict[str, dict[str, float]]) -> None:
    from rich.markup import escape

    from scalebio_cli.console import console

    parts = [f"{n}: {r['draws']:,} draws of {r['distinct']:,} distinct records ({r['draws_per_record']:.2f} each on "
             "average)" for n, r in found.items()]
    console.print(f"[yellow]note:[/] draws repeat records (--replacement): {escape('; '.join(parts))}; a fine-tune "
                  "on this sample sees those records several times an epoch")


def floored(weights: dict[str, float], min_weight: float) -> tuple[dict[str, float], list[str]]:
    """The weights with every source below `min_weight` set to 0 and the rest rescaled to sum to 1, and the names
    left out. Why: a draw by weights gives a source of weight 0.02 about one record in 50, whatever the run said
    about it; with many groups those single records add up (issue 40: 3 of 40 from groups at 0.02-0.03, all bad)."""
    if min_weight <= 0:
        return dict(weights), []
    out = [n for n, w in weights.items() if w < min_weight]
    kept = sum(w for n, w in weights.items() if n not in out)
    if kept <= 0:
        best = max(weights.values())
        raise InputError(f"--min-weight {min_weight:g}: every source's weight is below it (the largest is "
                         f"{best:.4g}); lower it")
    return {n: (0.0 if n in out else w / kept) for n, w in weights.items()}, out


def run(weights: dict[str, float], sources: dict[str, DataSource], num_samples: int, output: Path, seed: int = 0,
        replacement: bool = False, weights_file: str = "", sizes: dict[str, int] | None = None,
        fmt: str = "original", rank_by: Path | None = None,
        too_small_hint: str = "use --replacement, or ask for fewer samples", min_weight: float = 0.0
        ) -> dict[str, Any]:
    """Write OUT.jsonl (or OUT.parquet) and OUT.manifest.json; returns the manifest. Raises InputError before
    writing anything. `rank_by`: a `select --scores` file; each source's quota is then its best-scored records.
    `too_small_hint`: what the caller's user can do about a source smaller than its quota (their options).
    `min_weight`: sources below it get no records; the others share N in proportion to their weights."""
    names = list(weights)
    drawn, left_out = floored(weights, min_weight)
    sizes = sizes or {name: data_sources.count(sources[name]) for name in names}
    counts = dict(zip(names, largest_remainder(num_samples, [drawn[n] for n in names])))
    if not replacement:
        short = [f"source '{n}' has {sizes[n]:,} records but {counts[n]:,} were asked for without replacement "
                 f"({too_small_hint})" for n in names if counts[n] > sizes[n]]
        if short:
            raise InputError(short)
    empty = [f"source '{n}' has no records but {counts[n]:,} were asked for" for n in names
             if counts[n] and sizes[n] == 0]
    if empty:
        raise InputError(empty)
    scores = load_scores(rank_by, {n: sizes[n] for n in names if counts[n]}) if rank_by is not None else None

    rng = np.random.default_rng([seed, _STREAM])
    positions = rng.permutation(num_samples)  # where each drawn record lands in the shuffled output
    manifest_path = output.with_name(output.stem + ".manifest.json")
    chosen, start, repeated = [], 0, {}
    for k, name in enumerate(names):
        n = counts[name]
        pick_rng = np.random.default_rng([seed, _STREAM, k])
        if scores is not None and n:
            picks = ranked_picks(scores[name], n)
        else:
            picks = (pick_rng.integers(0, sizes[name], n) if replacement
                     else pick_rng.choice(sizes[name], n, replace=False))
        if (found := repeats(picks)) is not None:
            repeated[name] = found
        chosen.append(Chosen(name, sources[name], picks, positions[start: start + n]))
        start += n
    write_records(chosen, num_samples, output, fmt)
    manifest = {"num_samples": num_samples, "counts": counts, "weights_file": weights_file, "seed": seed,
                "replacement": replacement, "weights": weights, "min_weight": min_weight, "left_out": left_out,
                "sources": {n: sources[n].path for n in names},
                "output": str(output), "format": fmt, "rank_by": str(rank_by) if rank_by else None,
                "repeats": repeated}
    write_json(manifest_path, manifest)
    if repeated:
        _note_repeats(repeated)
    if left_out:
        from rich.markup import escape

        from scalebio_cli.console import console

        console.print(f"[yellow]note:[/] --min-weight {min_weight:g} left out "
                      + escape(", ".join(f"{n} ({weights[n]:.3f})" for n in left_out)))
    return manifest


def baseline_weights(kind: str, sources: dict[str, DataSource]) -> tuple[dict[str, float], dict[str, int]]:
    """`uniform` (equal weights) or `proportional` (to the number of records) over `sources`."""
    sizes = {name: data_sources.count(source) for name, source in sources.items()}
    if kind == "uniform":
        return {name: 1.0 / len(sources) for name in sources}, sizes
    total = sum(sizes.values())
    if total == 0:
        raise InputError("proportional weights: the sources hold no records")
    return {name: n / total for name, n in sizes.items()}, sizes


@dataclass
class Draw:
    """What to sample: the probabilities, the source files, how the manifest names the weights, known sizes."""

    probs: dict[str, float]
    sources: dict[str, DataSource]
    label: str
    sizes: dict[str, int] | None = None


def baseline_draw(kind: str, named: dict[str, DataSource], output: Path, inputs: dict[str, str] | None = None) -> Draw:
    """`--weights uniform|proportional` over `named` (each labelled in messages by its key: `--sources NAME` or
    `data.sources.NAME`); every record of every source is checked first, since no reweight run vouches for them."""
    if not named:
        raise InputError(f"--weights {kind}: name the sources with --sources NAME=FILE ... or --config")
    check_sample(output, list(named.values()), inputs or {}, parse_records=True)
    probs, sizes = baseline_weights(kind, named)
    return Draw(probs, named, kind, sizes)


def weights_file_draw(path: str, output: Path, allow_changed_sources: bool, averaged: bool) -> Draw:
    """The weights (final or averaged) of a weights.json, validated, with the sources and sizes it records."""
    from scalebio_cli.recipe.preflight import model_files
    from scalebio_cli.results import weights_file

    probs, doc = weights_file.load(path, allow_changed_sources, averaged)
    named = weights_file.doc_sources(doc, list(probs))
    validation = doc.get("validation") if isinstance(doc.get("validation"), dict) else {}
    sets = {"": validation} if "path" in validation else validation  # one set, or named sets
    inputs = {"the weights file": path}
    inputs |= {f"the validation file {n}".strip(): str(v.get("path") or "") for n, v in sets.items()
               if isinstance(v, dict)}
    inputs |= model_files(doc.get("model") if isinstance(doc.get("model"), str) else None)
    # Records of changed sources are no longer vouched for by the reweight run that read them.
    check_sample(output, list(named.values()), inputs, parse_records=allow_changed_sources)
    recorded = {n: doc["sources"][n].get("num_examples") for n in probs}
    sizes = recorded if not allow_changed_sources and all(isinstance(v, int) for v in recorded.values()) else None
    return Draw(probs, named, str(Path(path).resolve()), sizes)  # sizes: weights_file.load checked them


def check_sample(output: Path, sources: list[DataSource], inputs: dict[str, str], parse_records: bool) -> None:
    """sample's sources (each labelled by its key, `--sources NAME` or `data.sources.NAME`; every record parsed
    when no weights file vouches for them) and its two outputs, which must be none of the sources nor `inputs`."""
    from scalebio_cli.recipe import preflight

    problems = []
    if parse_records:
        for source in sources:
            problems += preflight.source_problems(source)
    inputs = {s.key: s.path for s in sources} | inputs
    manifest = output.with_name(output.stem + ".manifest.json")
    problems += preflight.output_file_problems("--output", output, inputs)
    problems += preflight.output_file_problems("--output (its manifest)", manifest, inputs)
    if problems:
        raise InputError(problems)
