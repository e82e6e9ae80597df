"""compare.json (`scalebio-compare/2`): per mix, records, tokens, cost, and per test set and metric the mean over
seeds with the paired difference to the baseline mix; the base model's row; the ceiling of single sources.
"""

from __future__ import annotations

import statistics
from typing import Any

from scalebio_cli.comparing.cells import Cell, Comparison
from scalebio_cli.comparing.cost import mix_cost
from scalebio_cli.comparing.mixes import default_baseline
from scalebio_cli.results import paired, reuse

FORMAT = "scalebio-compare/2"
METRICS = ("loss", "perplexity", "accuracy", "accuracy_math_verify")


def summary(values: list[float] | list[int]) -> dict[str, Any]:
    """mean, sample standard deviation over seeds (None for one seed: there is no spread to speak of), values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "per_seed": values}


def _results(c: Comparison, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for test in c.tests:
        entries = [d["results"][test] for d in per_seed]
        results[test] = {m: summary([float(e[m]) for e in entries]) for m in METRICS
                         if all(e.get(m) is not None for e in entries)}
    return results


def aggregate(c: Comparison, docs: dict[str, list[dict[str, Any]]], cells: list[Cell],
              base: dict[str, Any] | None) -> dict[str, Any]:
    baseline = default_baseline(c.mixes, c.baseline)
    mixes = {}
    for name, per_seed in docs.items():
        mine = [x for x in cells if x.mix.name == name]
        seconds = [float((reuse.read_json(x.folder / "cell.json") or {}).get("finetune_seconds") or 0) for x in mine]
        mixes[name] = {"spec": c.mixes[name].spec, "kind": c.mixes[name].kind,
                       "records": summary([x.records for x in mine]), "tokens": summary([x.tokens for x in mine]),
                       "cost": mix_cost(c.mixes[name], statistics.fmean(seconds) if seconds else 0.0),
                       "results": _results(c, per_seed)}
    for name, mix in mixes.items():
        if name == baseline:
            continue
        for test, metrics in mix["results"].items():
            for metric, entry in metrics.items():
                against = mixes[baseline]["results"].get(test, {}).get(metric)
                if against:
                    entry["vs_baseline"] = paired.versus(entry["per_seed"], against["per_seed"])
    singles = [n for n, m in c.mixes.items() if m.kind == "source"]
    ceiling = paired.ceiling(mixes, singles, next(iter(c.tests))) if len(singles) > 1 else None
    base_results = None if base is None else base["results"]
    return {"format": FORMAT, "seeds": c.seeds, "num_samples": c.num_samples, "match": c.match,
            "baseline": baseline, "model": c.recipe.model, "tests": c.tests, "generate": c.generate,
            "base": None if base_results is None else {"results": base_results}, "mixes": mixes,
            "ceiling": ceiling, "warnings": paired.untrained_warnings(mixes, base_results)}
