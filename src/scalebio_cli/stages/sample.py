"""`scalebio sample`: draw N records from the sources in proportion to their weights.

Counts are exact (largest-remainder rounding, so they add up to N). The records are streamed (data/out/record_writer.py,
which `select` shares): each source file is read once and only the chosen records are parsed, and memory holds two
integer arrays of length N, never whole files.
`fmt="messages"` writes every record in one schema (`{"messages": [...], "source": NAME}`, data/out/normalize.py); an
output ending in `.parquet` is written as JSON lines first and converted in batches (data/out/parquet_out.py).
"""

from __future__ import annotations

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


def run(weights: dict[str, float], sources: dict[str, DataSource], num_samples: int, output: Path, seed: int = 0,
        replacement: bool = False, weights_file: str = "", sizes: dict[str, int] | None = None,
        fmt: str = "original") -> dict[str, Any]:
    """Write OUT.jsonl (or OUT.parquet) and OUT.manifest.json; returns the manifest. Raises InputError before
    writing anything."""
    names = list(weights)
    sizes = sizes or {name: data_sources.count(sources[name]) for name in names}
    counts = dict(zip(names, largest_remainder(num_samples, [weights[n] for n in names])))
    if not replacement:
        short = [f"source '{n}' has {sizes[n]:,} records but {counts[n]:,} were asked for without replacement "
                 f"(use --replacement, or ask for fewer samples)" for n in names if counts[n] > sizes[n]]
        if short:
            raise InputError(short)
    empty = [f"source '{n}' has no records but {counts[n]:,} were asked for" for n in names
             if counts[n] and sizes[n] == 0]
    if empty:
        raise InputError(empty)

    rng = np.random.default_rng([seed, _STREAM])
    positions = rng.permutation(num_samples)  # where each drawn record lands in the shuffled output
    manifest_path = output.with_name(output.stem + ".manifest.json")
    chosen, start = [], 0
    for k, name in enumerate(names):
        n = counts[name]
        pick_rng = np.random.default_rng([seed, _STREAM, k])
        picks = (pick_rng.integers(0, sizes[name], n) if replacement
                 else pick_rng.choice(sizes[name], n, replace=False))
        chosen.append(Chosen(name, sources[name], picks, positions[start: start + n]))
        start += n
    write_records(chosen, num_samples, output, fmt)
    manifest = {"num_samples": num_samples, "counts": counts, "weights_file": weights_file, "seed": seed,
                "replacement": replacement, "weights": weights, "sources": {n: sources[n].path for n in names},
                "output": str(output), "format": fmt}
    write_json(manifest_path, manifest)
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
    from scalebio_cli.recipe.preflight import check_sample

    if not named:
        raise InputError(f"--weights {kind}: name the sources with --sources NAME=FILE ... or --config")
    check_sample(output, list(named.values()), inputs or {}, parse_records=True)
    probs, sizes = baseline_weights(kind, named)
    return Draw(probs, named, kind, sizes)


def weights_file_draw(path: str, output: Path, allow_changed_sources: bool, averaged: bool) -> Draw:
    """The weights (final or averaged) of a weights.json, validated, with the sources and sizes it records."""
    from scalebio_cli.recipe.preflight import check_sample, model_files
    from scalebio_cli.results import weights_file

    probs, doc = weights_file.load(path, allow_changed_sources, averaged)
    named = data_sources.doc_sources(doc, list(probs))
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
