"""The verdict per source is calibrated (train/verdict.py; ALGORITHM.md "How sure a run is"): simulated runs of
the estimator alone, under no signal and under a shift.

A simulated run: K sources, each an AR(1) series of n lam steps (rho: how strongly a step follows the last), tied
as the real ones are (a_k = x_k - s.x, so sum_k s_k a_k = 0 for weights s), and the contrasts the verdict tests
(each source against the rest, `verdict.contrasts`). Under no signal the familywise rate of any verdict must stay
at the level (5%) up to Monte Carlo error, with the weights fixed or settling on one source as a real run's do;
`make test` checks a grid that spans the range quickly, the slow test the whole grid with more runs and prints
the power on a shifted series.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from scalebio_cli.train import verdict

LEVEL = 0.05


def simulate(rho: float, n: int, k: int, runs: int, rng: np.random.Generator, shift: float = 0.0,
             settle: float = 0.0) -> np.ndarray:
    """(runs, k, n) contrasts of tied AR(1) series with unit innovations; `shift` added to source 0 before tying
    (in units of its stationary standard deviation). `settle`: the weight source 0 settles at, from uniform, most
    of the way within the first quarter of the run as a real run's weights move (0: each run's weights fixed,
    drawn around uniform)."""
    a, s = advantages(rho, n, k, runs, rng, shift, settle)
    return np.moveaxis(verdict.contrasts(np.moveaxis(a, 1, 2), np.moveaxis(s, 1, 2)), 2, 1)


def advantages(rho: float, n: int, k: int, runs: int, rng: np.random.Generator, shift: float = 0.0,
               settle: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """`simulate`'s advantages a_k = x_k - s.x and the weights s behind them, both (runs, k, n)."""
    noise = rng.normal(size=(runs, k, n))
    x = np.empty_like(noise)
    sd = 1 / math.sqrt(1 - rho ** 2)
    x[..., 0] = noise[..., 0] * sd
    for t in range(1, n):
        x[..., t] = rho * x[..., t - 1] + noise[..., t]
    x[:, 0] += shift * sd
    if settle:
        end = np.full(k, (1 - settle) / (k - 1))
        end[0] = settle
        moved = 1 - np.exp(-np.arange(n) / (n / 8))
        s = (1 / k + (end - 1 / k)[:, None] * moved)[None].repeat(runs, axis=0)
    else:
        s = rng.dirichlet(np.full(k, 5.0), size=runs)[..., None].repeat(n, axis=2)
    return x - np.einsum("rkn,rkn->rn", s, x)[:, None, :], s


def familywise(rho: float, n: int, k: int, runs: int, seed: int, min_batch: int = 1, settle: float = 0.0) -> float:
    p, _ = verdict.evaluate_many(simulate(rho, n, k, runs, np.random.default_rng(seed), settle=settle), min_batch)
    return float(np.mean((np.nan_to_num(p, nan=1.0) < LEVEL).any(axis=1)))


def power(rho: float, n: int, k: int, runs: int, seed: int, shift: float) -> float:
    """How often the shifted source 0 is called, in the right direction."""
    p, means = verdict.evaluate_many(simulate(rho, n, k, runs, np.random.default_rng(seed), shift))
    return float(np.mean((np.nan_to_num(p[:, 0], nan=1.0) < LEVEL) & (means[:, 0] > 0)))


def allowed(runs: int) -> float:
    """The level plus three Monte Carlo standard errors of a rate estimated from `runs` runs."""
    return LEVEL + 3 * math.sqrt(LEVEL * (1 - LEVEL) / runs)


@pytest.mark.parametrize("rho,n,k", [(0.0, 20, 3), (0.0, 300, 10), (0.5, 60, 2), (0.5, 300, 5), (0.8, 120, 3),
                                     (0.9, 300, 10), (0.9, 1000, 4)])
def test_no_signal_rarely_gets_a_verdict(rho: float, n: int, k: int) -> None:
    runs = 600
    assert familywise(rho, n, k, runs, seed=int(100 * rho) + n + k) <= allowed(runs)


@pytest.mark.parametrize("rho,n,k,settle", [(0.0, 200, 3, 0.9), (0.5, 300, 5, 0.95), (0.8, 1000, 2, 0.99)])
def test_no_signal_while_the_weights_settle_rarely_gets_a_verdict(rho: float, n: int, k: int,
                                                                  settle: float) -> None:
    """The contrast divides by (1 - s_k) in effect: as a source's weight nears 1 its steps weigh more. Under no
    signal that changes the spread over the run, not the mean, and the batches still hold the level."""
    runs = 600
    assert familywise(rho, n, k, runs, seed=n + k, settle=settle) <= allowed(runs)


def test_the_contrast_is_the_advantage_against_the_rest() -> None:
    """c_k = a_k / (1 - s_k) with every source present (the sign of lam's gradient); absent sources and a source
    alone in its step have none; the others are centred over the sources present."""
    s = np.array([0.7, 0.2, 0.1])
    x = np.array([0.3, -0.5, 1.2])
    a = x - s @ x
    c = verdict.contrasts(a[None], s[None])[0]
    assert c == pytest.approx(a / (1 - s))
    assert c[0] == pytest.approx(x[0] - (0.2 * x[1] + 0.1 * x[2]) / 0.3)
    absent = np.array([[np.nan, 0.4, -0.4], [0.0, np.nan, np.nan]])
    c = verdict.contrasts(absent, np.array([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    assert np.isnan(c[0, 0]) and c[0, 1:] == pytest.approx([0.8, -0.8]) and np.isnan(c[1]).all()


def test_a_settled_source_keeps_its_verdict() -> None:
    """The demo's case: source 0 better than the rest while its weight settles at 0.9. Its advantage shrinks with
    (1 - s_0), a drift that widens the batch means' spread; the contrast, which the verdict tests, does not."""
    rng = np.random.default_rng(8)
    a, s = advantages(0.0, 200, 3, 300, rng, shift=0.3, settle=0.9)
    p_advantage, _ = verdict.evaluate_many(a)
    c = np.moveaxis(verdict.contrasts(np.moveaxis(a, 1, 2), np.moveaxis(s, 1, 2)), 2, 1)
    p_contrast, means = verdict.evaluate_many(c)
    called = np.mean((np.nan_to_num(p_contrast[:, 0], nan=1.0) < LEVEL) & (means[:, 0] > 0))
    called_before = np.mean(np.nan_to_num(p_advantage[:, 0], nan=1.0) < LEVEL)
    assert called >= 0.75 and called >= called_before + 0.08, (called, called_before)  # measured: 0.81, 0.65


def test_the_lisa_floor_and_a_short_run_mean_unclear() -> None:
    """Batches never shorter than `min_batch` (the LISA interval): 60 steps in batches of 20 are 3 batches, fewer
    than MIN_BATCHES, so even a large shift gets no verdict, and the error is not reported."""
    a = simulate(0.0, 60, 3, 1, np.random.default_rng(0), shift=3.0)[0]
    evidence = verdict.evaluate(list(a), list(a), min_batch=20)
    assert all(e["verdict"] == "unclear" and e["p"] is None and e["stderr"] is None for e in evidence)
    assert evidence[0]["batch_steps"] == 20 and evidence[0]["batches"] == 3
    called = verdict.evaluate(list(a), list(a), min_batch=1)
    assert called[0]["verdict"] == "raised" and called[0]["p"] < LEVEL


def test_a_shift_is_called_and_reported_with_its_batches() -> None:
    a, _ = advantages(0.5, 400, 3, 1, np.random.default_rng(1), shift=0.5)
    c = simulate(0.5, 400, 3, 1, np.random.default_rng(1), shift=0.5)[0]
    evidence = verdict.evaluate(list(a[0]), list(c))
    assert evidence[0]["verdict"] == "raised"
    assert evidence[0]["z"] == pytest.approx(evidence[0]["advantage"] / evidence[0]["stderr"])
    assert evidence[0]["t"] == pytest.approx(evidence[0]["contrast"] / evidence[0]["contrast_stderr"])
    assert evidence[0]["contrast"] > evidence[0]["advantage"] > 0
    assert evidence[0]["batches"] >= verdict.MIN_BATCHES and evidence[0]["autocorrelation_time"] > 1.5
    flipped = verdict.evaluate([-x for x in a[0]], [-x for x in c])
    assert flipped[0]["verdict"] == "lowered"


def test_student_t_and_holm_are_exact() -> None:
    stats = pytest.importorskip("scipy.stats")
    t = np.array([0.0, 0.3, 1.0, 2.2, 4.0, 9.0])
    for dof in (1, 2, 3, 4, 7, 10, 51):
        assert verdict.t_two_sided(t, dof) == pytest.approx(2 * stats.t.sf(t, dof), abs=1e-9)
        assert verdict.t_quantile(0.01, dof) == pytest.approx(stats.t.ppf(0.995, dof), rel=1e-6)
    p = np.array([0.01, 0.04, 0.03, np.nan])  # four tests, one of them untested (counted as p = 1)
    assert verdict.holm(p)[:3] == pytest.approx([0.04, 0.09, 0.09]) and np.isnan(verdict.holm(p)[3])


def test_the_autocorrelation_time_of_ar1() -> None:
    """Geyer's initial sequence recovers tau = (1 + rho) / (1 - rho) on long series."""
    for rho in (0.0, 0.5, 0.8):
        a = simulate(rho, 4000, 2, 20, np.random.default_rng(2))[:, 0]  # (contrast of two AR(1): still AR(1))
        tau, _ = verdict.integrated_time(verdict.autocorrelation(a))
        assert np.median(tau) == pytest.approx((1 + rho) / (1 - rho), rel=0.2)


def test_a_drifting_mean_is_not_read_as_correlation() -> None:
    """The demo's advantages drift (a clean source's shrinks as its weight nears 1): about their least-squares line
    the series are nearly independent, so the batches stay short enough for a verdict; the drift itself widens the
    batch means' spread, so a trend that crosses zero (mean zero: no signal) is not called more often than the level."""
    rng = np.random.default_rng(4)
    runs, n, k = 1000, 200, 3
    a = simulate(0.3, n, k, runs, rng)
    t = (np.arange(n) - (n - 1) / 2) / n
    drifting = a + rng.normal(size=(runs, k, 1)) * 2.0 * t  # slopes of +-2 sd over the run, mean zero
    s = rng.dirichlet(np.full(k, 5.0), size=runs)[:, None, :]
    drifting = np.moveaxis(verdict.contrasts(np.moveaxis(drifting, 1, 2), s), 2, 1)
    p, _ = verdict.evaluate_many(drifting)
    assert float(np.mean((np.nan_to_num(p, nan=1.0) < LEVEL).any(axis=1))) <= allowed(runs)
    trend = np.linspace(1.5, 0.0, n)[None, :] * np.array([[1.0], [-1.0], [0.0]])  # raised, lowered, neither
    decaying = list(simulate(0.3, n, k, 1, np.random.default_rng(5))[0] + trend)
    evidence = verdict.evaluate(decaying, decaying)
    assert evidence[0]["autocorrelation_time"] < 3 and evidence[0]["batches"] >= 10
    assert [e["verdict"] for e in evidence[:2]] == ["raised", "lowered"]


def test_a_short_run_says_how_many_steps_a_verdict_needs() -> None:
    a = simulate(0.0, 30, 3, 1, np.random.default_rng(3))[0]
    evidence = dict(zip("abc", verdict.evaluate(list(a), list(a), min_batch=20)))
    assert verdict.steps_for_verdict(evidence, LEVEL, every=1) >= verdict.MIN_BATCHES * 20


@pytest.mark.slow
def test_calibration_over_the_whole_grid(capsys: pytest.CaptureFixture[str]) -> None:
    """rho 0-0.9, n 20-1,000, K 2-10: the familywise rate under no signal; then the power against a shift of
    half a standard deviation of the series. Prints both tables (docs/internals.md quotes them)."""
    runs, worst, lines = 2000, 0.0, ["| rho | n | K=2 | K=3 | K=5 | K=10 |", "|---|---|---|---|---|---|"]
    for rho in (0.0, 0.5, 0.8, 0.9):
        for n in (20, 60, 300, 1000):
            rates = [familywise(rho, n, k, runs, seed=int(1000 * rho) + n + k) for k in (2, 3, 5, 10)]
            worst = max(worst, *rates)
            lines.append(f"| {rho} | {n} | " + " | ".join(f"{r:.3f}" for r in rates) + " |")
    lines += ["", "weights settling on source 0 (at 0.95), K = 3:", "| rho | n=60 | n=300 | n=1000 |",
              "|---|---|---|---|"]
    for rho in (0.0, 0.5, 0.9):
        rates = [familywise(rho, n, 3, runs, seed=int(1000 * rho) + n, settle=0.95) for n in (60, 300, 1000)]
        worst = max(worst, *rates)
        lines.append(f"| {rho} | " + " | ".join(f"{r:.3f}" for r in rates) + " |")
    lines += ["", "| rho | n=60 | n=300 | n=1000 |", "|---|---|---|---|"]
    for rho in (0.0, 0.5, 0.9):
        lines.append(f"| {rho} | " + " | ".join(f"{power(rho, n, 3, 500, 7, 0.5):.2f}" for n in (60, 300, 1000))
                     + " |")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert worst <= allowed(runs)
