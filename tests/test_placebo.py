"""The placebo control (`reweight.placebo: true`, CONTRACT v4; train/placebo.py): a random half of the largest
source as a source of its own. Reported under weights.json `placebo`, apart from `weights` (renormalised over the
real sources), `sample` and `export`; on the demo its verdict is "unclear" while clean and the two corrupted
sources are called (slow: the 200-step demo)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke, write_recipe
from scalebio_cli.errors import InputError
from scalebio_cli.train.placebo import split


class Records:
    """A stand-in for a source's tokens: records 0..n-1, every one kept."""

    def __init__(self, n: int):
        self.num_records = n

    def resolve(self, positions: list[int]) -> list[int | None]:
        return list(positions)


def test_the_largest_source_is_halved_at_random_seeded() -> None:
    names, sources, control = split(["a", "b", "placebo"], [Records(10), Records(31), Records(5)], seed=3)
    assert names == ["a", "b", "placebo", "placebo-b"] and control.split_from == "b" and control.records == 15
    everything = list(range(31))
    kept = [p for p, s in zip(everything, sources[1].resolve(everything)) if s is not None]
    drawn = [p for p, s in zip(everything, sources[3].resolve(everything)) if s is not None]
    assert len(kept) == 16 and len(drawn) == 15 and not set(kept) & set(drawn)  # two halves, all records
    again = split(["a", "b", "placebo"], [Records(10), Records(31), Records(5)], seed=3)[1][3]
    assert again.resolve(everything) == sources[3].resolve(everything)
    other = split(["a", "b", "placebo"], [Records(10), Records(31), Records(5)], seed=4)[1][3]
    assert other.resolve(everything) != sources[3].resolve(everything)
    with pytest.raises(InputError, match="at least 4"):
        split(["a", "b"], [Records(3), Records(2)], seed=0)


def test_placebo_is_reported_apart_and_sample_leaves_it_out(demo: Path, tmp_path: Path) -> None:
    """A short run: the placebo has its weight and verdict under `placebo`; `weights` sum to 1 over the three real
    sources; the weights have not settled (too few lam steps) and the log says what to do; sample draws the real
    sources only."""
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    result = invoke("reweight", "--config", str(recipe), "reweight.steps=12", "reweight.log_every=6",
                    "reweight.placebo=true")
    assert result.returncode == 0, result.stderr[-3000:]
    path = tmp_path / "run" / "weights.json"
    doc = json.loads(path.read_text())
    assert list(doc["weights"]) == ["clean", "noisy", "offtopic"] == list(doc["sources"]) == list(doc["evidence"])
    assert math.isclose(sum(doc["weights"].values()), 1.0, abs_tol=1e-9)
    assert math.isclose(sum(doc["weights_averaged"].values()), 1.0, abs_tol=1e-9)
    assert all(list(p["weights"]) == ["clean", "noisy", "offtopic"] for p in doc["trajectory"])
    control = doc["placebo"]
    assert control["name"] == "placebo" and control["split_from"] == "clean" and control["records"] == 300
    assert 0 < control["weight"] < 1 and control["evidence"]["verdict"] == "unclear"
    assert doc["sources"]["clean"]["num_examples"] == 600  # sample draws from the whole source
    assert doc["settled"]["all"] is False and set(doc["settled"]["by_source"]) == set(doc["weights"])
    assert "placebo" in result.stderr and "weights still moving" in result.stderr
    out = tmp_path / "sampled.jsonl"
    result = invoke("sample", "--weights", str(path), "--num-samples", "60", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    drawn = {json.loads(line)["source"] for line in out.read_text().splitlines()}
    assert drawn <= {"clean", "noisy", "offtopic"}


@pytest.mark.slow
def test_on_the_demo_the_placebo_is_unclear_while_the_sources_are_called(demo: Path, tmp_path: Path) -> None:
    """The demo (200 steps, its recipe's settings) with a placebo: clean raised, noisy and offtopic lowered (each
    against the rest of the mixture), the placebo (half of clean, tested against the other half) unclear."""
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    result = invoke("reweight", "--config", str(recipe), "reweight.placebo=true")
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "run" / "weights.json").read_text())
    verdicts = {n: e["verdict"] for n, e in doc["evidence"].items()}
    assert verdicts == {"clean": "raised", "noisy": "lowered", "offtopic": "lowered"}, doc["evidence"]
    assert doc["placebo"]["evidence"]["verdict"] == "unclear", doc["placebo"]
    assert np.isfinite(doc["placebo"]["evidence"]["z"])


def test_a_source_is_not_tested_against_its_own_placebo() -> None:
    """A placebo holds its twin's data: left in the rest of the mixture it would cancel most of the twin's
    contrast (on SmolLM2's alpaca case clean ended unclear at t 1.2 beside a placebo of weight 0.7). The real
    sources' contrasts leave it out, so they are those of a run without it; the placebo's own is against its twin."""
    import torch

    from scalebio_cli.train.source_weights import SourceWeights

    rng = np.random.default_rng(0)
    lam = SourceWeights(4, lr=0.05, total_steps=40, warmup_ratio=0.0, device=torch.device("cpu"))
    for _ in range(40):  # clean, dot, shuffled, placebo (clean's data: the same paired differences but noise)
        d = np.array([-1.0, 1.0, 0.5, -1.0]) + 0.1 * rng.normal(size=4)
        m_u = torch.ones(4, dtype=torch.float64)
        lam.observe(len(lam.advantages), m_u + torch.tensor(d), m_u, torch.ones(4, dtype=torch.bool), alpha=1.0)
    a, with_twin = lam.series({3: 0})
    s = np.vstack([np.full((1, 4), 0.25), np.asarray(lam.history)[:-1]])
    real = np.stack(a, axis=1)
    rest = (s[:, 1:3] * real[:, 1:3]).sum(axis=1) / s[:, 1:3].sum(axis=1)
    assert with_twin[0] == pytest.approx(real[:, 0] - rest)  # clean against dot and shuffled only
    assert with_twin[3] == pytest.approx(real[:, 3] - real[:, 0])  # the placebo against clean
    assert with_twin[0].mean() > 1.0 and abs(with_twin[3].mean()) < 0.1
    _, in_rest = lam.series()  # the placebo counted as a source of the rest: clean's contrast mostly cancelled
    assert in_rest[0].mean() < 0.6 * with_twin[0].mean()
