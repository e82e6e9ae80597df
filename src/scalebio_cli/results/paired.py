"""Paired differences over seeds: seed k of every mix shares its fine-tuning randomness, so mix minus baseline seed by
seed removes what the seeds share, and the error of a difference is the spread of those differences, not of one arm.

The 95% interval is Student's t over the per-seed differences; with one seed it is undefined (None), never +-0.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

# Two-sided 95% quantiles of Student's t, df 1..30; beyond, the Cornish-Fisher expansion (error < 1e-4).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def ci95(values: list[float]) -> list[float] | None:
    """The 95% t-interval of the mean of `values`; None for fewer than two."""
    if len(values) < 2:
        return None
    mean, half = statistics.fmean(values), t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return [mean - half, mean + half]


def versus(values: list[float], baseline: list[float]) -> dict[str, Any]:
    """`mix - baseline`, seed by seed: per_seed, diff_mean, ci95 (None with one seed, and why)."""
    diffs = [a - b for a, b in zip(values, baseline)]
    out: dict[str, Any] = {"per_seed": diffs, "diff_mean": statistics.fmean(diffs), "ci95": ci95(diffs)}
    if out["ci95"] is None:
        out["note"] = "one seed: the interval is undefined"
    return out


def excludes_zero(entry: dict[str, Any]) -> bool | None:
    """Whether a paired difference's interval lies on one side of 0 (None: no interval)."""
    interval = entry.get("ci95")
    return None if not interval else interval[0] > 0 or interval[1] < 0


def ceiling(mixes: dict[str, Any], names: list[str], test: str) -> dict[str, Any] | None:
    """How far apart the single-source mixes `names` are on `test` loss: the best and worst by mean, their paired
    difference with its interval, and whether that spread is inside the seed noise (the interval holds 0)."""
    losses = {n: mixes[n]["results"].get(test, {}).get("loss") for n in names}
    losses = {n: v for n, v in losses.items() if v}
    if len(losses) < 2:
        return None
    best = min(losses, key=lambda n: losses[n]["mean"])
    worst = max(losses, key=lambda n: losses[n]["mean"])
    diff = versus(losses[worst]["per_seed"], losses[best]["per_seed"])
    return {"test": test, "best": best, "worst": worst, "spread": diff["diff_mean"], "ci95": diff["ci95"],
            "inside_noise": None if diff["ci95"] is None else not excludes_zero(diff)}


def ceiling_sentence(c: dict[str, Any]) -> str:
    spread = f"{c['worst']} - {c['best']} = {c['spread']:+.4f} {c['test']} loss"
    if c["inside_noise"] is None:
        return f"Single sources: {spread} (one seed: whether that is beyond the seed noise is undefined)."
    lo, hi = c["ci95"]
    if c["inside_noise"]:
        return (f"Single sources: {spread}, 95% CI [{lo:+.4f}, {hi:+.4f}] holds 0: the sources are inside the seed "
                "noise of each other, so no mixture of them can matter much on this data.")
    return f"Single sources: {spread}, 95% CI [{lo:+.4f}, {hi:+.4f}]: the choice of source matters here."


def untrained_warnings(mixes: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    """A mix whose fine-tuning moved a test loss from the base model's by less than its own seed spread (std over
    seeds) did not train enough for its comparison to mean anything."""
    if not base:
        return []
    out = []
    for name, mix in mixes.items():
        for test, metrics in mix["results"].items():
            entry, before = metrics.get("loss"), base.get(test, {}).get("loss")
            if not entry or before is None or len(entry["per_seed"]) < 2:
                continue
            moved = before - entry["mean"]
            if abs(moved) < entry["std"]:
                out.append(f"{name}: fine-tuning moved the {test} loss by {moved:+.4f} from the base model's "
                           f"{before:.4f}, less than its seed spread (std {entry['std']:.4f}): it barely trained; "
                           "raise finetune.lr or the steps before reading this comparison")
    return out
