"""compare's mixes: `NAME=SPEC` parsed (a weights file, a record file, uniform, proportional, one source), what
each draws from (its probabilities, the sizes and sources), whether it can draw N distinct records, and a record
file's seeded subsample.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from scalebio_cli.errors import InputError
from scalebio_cli.files import write_text
from scalebio_cli.recipe import Recipe

KEYWORDS = ("uniform", "proportional")
_SUBSAMPLE = 0xC0A  # a file mix's per-seed subsample


@dataclasses.dataclass(frozen=True)
class Mix:
    name: str
    spec: str  # `uniform`, `proportional`, a source name (kind source), or an absolute path
    kind: str  # uniform | proportional | weights | file | source


def parse_mixes(items: list[str]) -> dict[str, Mix]:
    """`NAME=SPEC` (or `uniform` / `proportional` alone); SPEC: a weights.json, a sample/select output, uniform,
    proportional, or `source:SOURCE` (one of data.sources alone)."""
    mixes: dict[str, Mix] = {}
    problems = []
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            name, spec = item, item
        if not name or not spec or (not sep and item not in KEYWORDS):
            problems.append(f"--mix {item!r}: expected NAME=SPEC (SPEC: a weights file, uniform, proportional, "
                            "source:SOURCE, or a sample file)")
        elif name in mixes:
            problems.append(f"--mix: the name '{name}' is given twice")
        elif name == "base":
            problems.append("--mix base: 'base' names the model before fine-tuning; choose another name")
        elif spec in KEYWORDS:
            mixes[name] = Mix(name, spec, spec)
        elif spec.startswith("source:"):
            mixes[name] = Mix(name, spec[len("source:"):], "source")
        else:
            path = Path(spec).expanduser().resolve()
            if path.is_file():
                mixes[name] = Mix(name, str(path), "weights" if _is_weights_file(path) else "file")
            else:
                problems.append(f"--mix {name}: file not found: {path}")
    if not mixes and not problems:
        problems.append("--mix: give at least one mix (NAME=SPEC)")
    if problems:
        raise InputError(problems)
    return mixes


def _is_weights_file(path: Path) -> bool:
    if path.suffix != ".json":
        return False
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and str(doc.get("format", "")).startswith("scalebio-weights/")


def default_baseline(mixes: dict[str, Mix], baseline: str | None) -> str:
    """`--baseline`, else `uniform` when there is such a mix, else the first mix."""
    return baseline or ("uniform" if "uniform" in mixes else next(iter(mixes)))


def draw_plan(recipe: Recipe, mix: Mix) -> tuple[dict[str, float], dict[str, int], dict[str, Any]]:
    """What a mix draws from: its probabilities, the sizes of its sources, and the sources by name (for a file mix,
    the file alone)."""
    from scalebio_cli.data.read import sources as data_sources
    from scalebio_cli.data.read.expand import recipe_sources
    from scalebio_cli.data.read.records import count_records
    from scalebio_cli.results import weights_file

    if mix.kind == "file":
        return {"file": 1.0}, {"file": count_records(mix.spec)}, {"file": data_sources.from_path("file", mix.spec)}
    if mix.kind == "weights":
        probs, doc = weights_file.load(mix.spec)
        return probs, {n: int(doc["sources"][n]["num_examples"]) for n in probs}, weights_file.doc_sources(
            doc, list(probs))
    named = recipe_sources(recipe)
    if mix.kind == "source":
        if mix.spec not in named:
            raise InputError(f"--mix {mix.name}=source:{mix.spec}: not a source of data.sources "
                             f"({', '.join(named)})")
        named = {mix.spec: named[mix.spec]}
    sizes = {n: data_sources.count(s) for n, s in named.items()}
    if mix.kind == "proportional":
        total = sum(sizes.values())
        return {n: s / total for n, s in sizes.items()} if total else dict.fromkeys(sizes, 0.0), sizes, named
    return {n: 1.0 / len(named) for n in named}, sizes, named


def feasibility(recipe: Recipe, mix: Mix, n: int) -> list[str]:
    """Whether the mix can draw n distinct records (compare never repeats a record: every mix trains on N distinct
    records), and if not, the largest -n it allows."""
    from scalebio_cli.data.out.mixture import largest_remainder

    try:
        probs, sizes, _ = draw_plan(recipe, mix)
    except InputError as exc:
        return exc.problems
    names = list(probs)

    def short(k: int) -> list[str]:
        counts = largest_remainder(k, [probs[s] for s in names])
        return [s for s, c in zip(names, counts) if c > sizes[s]]

    over = short(n)
    if not over:
        return []
    most = min(int(sizes[s] / probs[s]) if probs[s] > 0 else n for s in names)
    while most > 0 and short(most):
        most -= 1
    counts = dict(zip(names, largest_remainder(n, [probs[s] for s in names])))
    what = (f"{mix.spec} holds {sizes['file']:,} records" if mix.kind == "file" else
            ", ".join(f"source '{s}' holds {sizes[s]:,} records, {counts[s]:,} asked for" for s in over))
    return [f"--mix {mix.name}: -n {n:,} cannot be drawn without repeating records ({what}); compare trains every "
            f"mix on N distinct records: ask for --num-samples {most:,} or fewer"]


def subsample(path: str, size: int, n: int, seed: int, out: Path) -> None:
    """n of a record file's `size` records, seeded, unchanged (their `source` kept), in a seeded order."""
    from scalebio_cli.data.out.record_writer import json_line
    from scalebio_cli.data.read import sources as data_sources

    picks = np.random.default_rng([seed, _SUBSAMPLE]).choice(size, n, replace=False)
    slot = {int(p): j for j, p in enumerate(picks)}
    lines: list[str] = [""] * n
    for index, (_, record) in enumerate(data_sources.iter_records(data_sources.from_path("file", path))):
        if index in slot:
            lines[slot[index]] = json_line(record) + "\n"
    write_text(out, "".join(lines))
