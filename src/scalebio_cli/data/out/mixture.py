"""Integer counts and fractions that realise a mixture of sources with given probabilities.

`sample` and the exporters need the same arithmetic: counts that add up exactly (largest remainder), the largest
mixture that needs no record twice, and per-source keep-fractions for tools that subsample each file.
"""

from __future__ import annotations

import math


def largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Integer counts proportional to `weights` that add up to exactly `total`.

    Each source gets floor(total * w); the leftover units go to the largest fractional parts (ties: source order).
    """
    norm = sum(weights)
    quotas = [total * w / norm for w in weights]
    counts = [math.floor(q) for q in quotas]
    leftover = total - sum(counts)
    order = sorted(range(len(weights)), key=lambda k: (-(quotas[k] - counts[k]), k))
    for k in order[:leftover]:
        counts[k] += 1
    return counts


def keep_fractions(probs: list[float], sizes: list[int]) -> list[float]:
    """The fraction of each source's records to keep so that the kept records are mixed as `probs`.

    fraction_k = (p_k / n_k) / max_j (p_j / n_j): the source that limits the mixture is kept whole (1.0), every other
    is subsampled; no record is needed twice. Sources with p_k = 0 get 0.
    """
    rates = [p / n if n else 0.0 for p, n in zip(probs, sizes)]
    top = max(rates)
    return [r / top if top else 0.0 for r in rates]


def no_repeat_counts(probs: list[float], sizes: list[int]) -> list[int]:
    """Exact counts (largest remainder) of the largest mixture in which no source gives a record twice."""
    total = math.floor(min(n / p for p, n in zip(probs, sizes) if p > 0))
    while total > 0:
        counts = largest_remainder(total, probs)
        if all(c <= n for c, n in zip(counts, sizes)):
            return counts
        total -= 1  # a rounded-up count can exceed a source by one record
    return [0] * len(probs)
