"""A placebo control (`reweight.placebo: true`, CONTRACT v4): a random half of the largest source, split off as a
source of its own. It is the same data as the half left behind, so whatever weight and verdict it gets is the
run's noise floor, shown next to the real sources. weights.json reports it under `placebo`, apart from `weights`
(which are renormalised over the real sources), and `sample` and `export` never see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scalebio_cli.data.checks import WithoutRecords
from scalebio_cli.errors import InputError

MIN_RECORDS = 4
_STREAM = 0x9_1AC3B0  # the split's random stream, apart from the samplers' under the same seed


@dataclass(frozen=True)
class Placebo:
    name: str  # its name among the run's sources (the last one)
    split_from: str  # the source it was split from, which kept the other half
    records: int  # records of that source in the placebo's half

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "split_from": self.split_from, "records": self.records}


def split(names: list[str], sources: list[Any], seed: int) -> tuple[list[str], list[Any], Placebo]:
    """The run's sources with the largest one (most records; the first of equals) halved at random (seeded): the
    source keeps one half, the placebo, appended last, draws from the other. Both draw by record position as
    before (data/checks.WithoutRecords passes over the other half's records)."""
    largest = max(range(len(sources)), key=lambda k: (sources[k].num_records, -k))
    data = sources[largest]
    if data.num_records < MIN_RECORDS:
        raise InputError(f"reweight.placebo: the largest source, '{names[largest]}', has {data.num_records} records; "
                         f"a placebo halves it and needs at least {MIN_RECORDS}")
    order = np.random.default_rng([seed, _STREAM]).permutation(data.num_records)
    half, rest = order[: data.num_records // 2], order[data.num_records // 2:]
    name = "placebo" if "placebo" not in names else f"placebo-{names[largest]}"
    kept = [WithoutRecords(data, half) if k == largest else d for k, d in enumerate(sources)]
    return [*names, name], [*kept, WithoutRecords(data, rest)], Placebo(name, names[largest], len(half))


def renormalise(weights: dict[str, float], names: list[str]) -> dict[str, float]:
    """`weights` over `names` only, summing to 1 again."""
    total = sum(weights[n] for n in names)
    return {n: weights[n] / total for n in names}
