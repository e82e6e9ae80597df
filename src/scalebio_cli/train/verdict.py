"""How sure a run is of each source (CONTRACT v4 "A verdict per source"; ALGORITHM.md "How sure a run is").

Per source, two series over the lam steps (train/source_weights.py builds both):
- the advantage a_k = -(d_k - s.d): the source against the whole mixture, itself included (CONTRACT v3's
  `advantage`, `stderr`, `z`). It shrinks with (1 - s_k): a source whose weight nears 1 IS the mixture, so its
  advantage vanishes however clearly the run prefers it (the demo's clean source: z 2.3, t 4.8 at weight 0.89);
- the contrast c_k = a_k / (1 - s_k): the source against the rest of the mixture (the other sources, weighted as
  lam weighs them). It has the sign of lam's gradient at every step, and the same zero mean under no signal, but
  keeps its size as the weights settle. The verdict tests it (`contrast`, `contrast_stderr`, `t`, `p`); a
  placebo's contrast is against the source it was split from (zero mean by construction).

For each, whether its mean is away from zero. The series are autocorrelated (u and w carry Adam momentum, LISA
trains the same blocks for `interval` steps, lam drifts), so:

1. the integrated autocorrelation time tau = 1 + 2 sum_t rho_t is estimated by Geyer's (1992) initial positive
   (and monotone) sequence from the autocorrelation of the run's contrast series about their least-squares lines (a
   drifting mean is not correlation; see `detrend`), averaged over its sources (they share the mechanism; the
   average is far less noisy than one source's);
2. batches are BATCH_FACTOR x tau lam steps long, and never shorter than `min_batch` (the LISA interval in lam
   steps); with fewer than MIN_BATCHES batches there is no error estimate worth the name: "unclear";
3. batch means of that length are still slightly correlated, which biases their variance low (to first order
   by tau / (2 x batch length)); the variance is divided by that bias, estimated from the same autocorrelations,
   and never taken below the plain (independent-steps) variance;
4. t = mean / stderr is referred to Student t with (batches - 1) degrees of freedom (two-sided p);
5. the K p values of a run are tested together: Holm's step-down adjustment keeps the familywise rate of any
   verdict under no signal at the level, whatever the dependence between the K statistics (they are tied:
   sum_k s_k a_k = 0).

tests/test_verdict.py simulates this very code under no signal (AR(1) series, rho up to 0.9, 20 to 1,000 steps,
2 to 10 tied sources, weights fixed or settling on one source) and under a shift. Everything is numpy over leading
axes, so a simulation runs thousands of runs at once and a real run is the case of one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BATCH_FACTOR = 4  # batch length >= BATCH_FACTOR x tau: batch means nearly uncorrelated (their bias ~ 1/(2 x 4))
MIN_BATCHES = 4  # fewer batches: no verdict (3 degrees of freedom is the least a t reference is worth)
DEFAULT_LEVEL = 0.05


def contrasts(a: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Each source's advantage minus the rest of the mixture's: c_k = a_k - sum_{j != k} s_j a_j / sum_{j != k} s_j
    over the sources present. a: (..., steps, K) advantages, NaN where absent; s: the weights each lam step used,
    broadcast to a. Since sum_j s_j a_j = 0 over the present sources, c_k = a_k / (1 - s_k) (s renormalised over
    them): the sign of lam's gradient, without the factor that makes a settled source's advantage vanish. Computed
    from the others' advantages rather than by that division, which would blow up a float32 advantage's rounding
    as s_k nears 1. NaN where the source is absent or alone."""
    present = ~np.isnan(a)
    s = np.broadcast_to(s, a.shape)
    weighted = np.where(present, s * np.nan_to_num(a), 0.0)
    mass = np.where(present, s, 0.0)
    rest_mass = mass.sum(axis=-1, keepdims=True) - mass
    rest = weighted.sum(axis=-1, keepdims=True) - weighted
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(present & (rest_mass > 0), a - rest / rest_mass, np.nan)


def autocorrelation(x: np.ndarray) -> np.ndarray:
    """Sample autocorrelation of each series along the last axis (lags 0..n-1; the biased, positive-definite
    estimator: autocovariances divided by n). A constant series has rho_0 = 1 and zeros beyond."""
    n = x.shape[-1]
    y = x - x.mean(axis=-1, keepdims=True)
    spectrum = np.fft.rfft(y, 2 * n, axis=-1)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), 2 * n, axis=-1)[..., :n] / n
    var = acov[..., :1]
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(var > 0, acov / np.where(var > 0, var, 1.0), 0.0)
    rho[..., 0] = 1.0
    return rho


def detrend(x: np.ndarray) -> np.ndarray:
    """Residuals of each series (last axis) from its least-squares line. The correlation time is estimated from
    these: a series whose mean drifts (the advantage of a clean source shrinks as its weight nears 1) keeps a
    positive sample autocorrelation at every lag, which Geyer's sequence read as tau = 21 lam steps on the 200-step
    demo (2 batches: no error at all). A trend itself stays in the batch means and widens their spread
    (tests/test_verdict.py: a zero-mean trend is not called more often than the level); a mean that wanders like a
    random walk fools any single-run error, this one included (docs/internals.md): the placebo is the check."""
    n = x.shape[-1]
    if n < 3:
        return x - x.mean(axis=-1, keepdims=True)
    t = np.arange(n, dtype=np.float64) - (n - 1) / 2
    slope = (x * t).sum(axis=-1, keepdims=True) / (t * t).sum()
    return x - x.mean(axis=-1, keepdims=True) - slope * t


def integrated_time(rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Geyer's initial monotone sequence estimate of tau = 1 + 2 sum_{t>=1} rho_t from autocorrelations along the
    last axis: sums of adjacent pairs Gamma_m = rho_2m + rho_2m+1, kept while positive, made non-increasing.
    Returns (tau >= 1, the number of lags kept) for each series."""
    pairs = rho.shape[-1] // 2
    if pairs == 0:
        shape = rho.shape[:-1]
        return np.ones(shape), np.ones(shape, dtype=np.int64)
    gamma = rho[..., 0:2 * pairs:2] + rho[..., 1:2 * pairs:2]
    positive = np.cumprod(gamma > 0, axis=-1).astype(bool)
    monotone = np.minimum.accumulate(np.where(positive, gamma, np.inf), axis=-1)
    kept = np.where(positive, monotone, 0.0)
    tau = np.maximum(2.0 * kept.sum(axis=-1) - 1.0, 1.0)
    return tau, 2 * positive.sum(axis=-1)


def batch_length(tau: np.ndarray | float, min_batch: int = 1) -> np.ndarray:
    """Lam steps per batch: BATCH_FACTOR x tau, at least `min_batch` (the LISA interval in lam steps)."""
    return np.maximum(np.ceil(BATCH_FACTOR * np.asarray(tau, dtype=np.float64) - 1e-9), max(1, min_batch)).astype(
        np.int64)


def _bias(rho: np.ndarray, lags: np.ndarray, tau: np.ndarray, b: int, m: int) -> np.ndarray:
    """E[b x (sample variance of m batch means)] / (tau x var): how much batch means of length b under-estimate the
    long-run variance, from the autocorrelations kept by the initial sequence. Two first-order terms: the variance
    of one batch mean (b Var = var (1 + 2 sum_{t<b} (1 - t/b) rho_t)) and the lag-one correlation psi of adjacent
    batch means (which lowers the sample variance of m of them by 2 psi / m)."""
    t = np.arange(rho.shape[-1])
    r = np.where((t >= 1) & (t < lags[..., None]), rho, 0.0)
    within = (1.0 + 2.0 * (r * np.clip(1.0 - t / b, 0.0, None)).sum(axis=-1)) / tau
    psi = (r * np.clip(np.minimum(t, 2 * b - t), 0, None)).sum(axis=-1) / (b * tau * np.maximum(within, 1e-12))
    return np.clip(within * (1.0 - 2.0 * psi / m), 0.25, 1.0)


def t_two_sided(t: np.ndarray | float, dof: int) -> np.ndarray:
    """P(|T| >= |t|) for Student t with integer `dof` >= 1 (Abramowitz & Stegun 26.7.3-4: a finite series in
    theta = atan(|t| / sqrt(dof)), exact for integer degrees of freedom; numpy only)."""
    t = np.abs(np.asarray(t, dtype=np.float64))
    theta = np.arctan(t / math.sqrt(dof))
    c2, s = np.cos(theta) ** 2, np.sin(theta)
    if dof % 2 == 1:
        term, total = np.ones_like(t), np.ones_like(t)
        for j in range(1, (dof - 1) // 2):  # 1 + 2/3 c^2 + (2*4)/(3*5) c^4 + ...
            term = term * c2 * (2 * j) / (2 * j + 1)
            total = total + term
        inside = theta + (s * np.cos(theta) * total if dof > 1 else 0.0)
        prob = 2.0 / math.pi * inside
    else:
        term, total = np.ones_like(t), np.ones_like(t)
        for j in range(1, dof // 2):  # 1 + 1/2 c^2 + (1*3)/(2*4) c^4 + ...
            term = term * c2 * (2 * j - 1) / (2 * j)
            total = total + term
        prob = s * total
    return np.clip(1.0 - prob, 0.0, 1.0)


def t_quantile(p: float, dof: int) -> float:
    """The |t| at which the two-sided p of t with `dof` degrees of freedom is `p` (bisection on t_two_sided)."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(t_two_sided(mid, dof)) > p else (lo, mid)
    return hi


def batch_t(x: np.ndarray, b: int, rho: np.ndarray, lags: np.ndarray, tau: np.ndarray) -> dict[str, Any]:
    """Batch-means t test of mean 0 for series `x` (..., n) with batch length b; `rho`, `lags`, `tau` describe
    the run each series belongs to (broadcast over x's leading axes but the last). Returns mean, stderr, z, p
    (unadjusted; NaN when fewer than MIN_BATCHES batches) and the batch count."""
    n = x.shape[-1]
    m = n // b
    mean = x.mean(axis=-1)
    plain = x.var(axis=-1, ddof=1) if n > 1 else np.full(mean.shape, np.nan)
    if m < MIN_BATCHES:
        stderr = np.sqrt(plain / n)
        return {"mean": mean, "stderr": stderr, "z": mean / np.where(stderr > 0, stderr, np.nan),
                "p": np.full(mean.shape, np.nan), "batches": m}
    means = x[..., n - m * b:].reshape(*x.shape[:-1], m, b).mean(axis=-1)  # the oldest remainder is left out
    long_run = b * means.var(axis=-1, ddof=1) / _bias(rho, lags, tau, b, m)
    stderr = np.sqrt(np.maximum(long_run, plain) / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(stderr > 0, mean / np.where(stderr > 0, stderr, 1.0), np.where(mean == 0, 0.0, np.inf))
    return {"mean": mean, "stderr": stderr, "z": z, "p": t_two_sided(z, m - 1), "batches": m}


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment along the last axis; NaN (untested) counts as p = 1 among the K tests."""
    filled = np.where(np.isnan(p), 1.0, p)
    k = filled.shape[-1]
    order = np.argsort(filled, axis=-1, kind="stable")
    ranked = np.take_along_axis(filled, order, axis=-1) * (k - np.arange(k))
    adjusted_sorted = np.minimum(np.maximum.accumulate(ranked, axis=-1), 1.0)
    adjusted = np.empty_like(adjusted_sorted)
    np.put_along_axis(adjusted, order, adjusted_sorted, axis=-1)
    return np.where(np.isnan(p), np.nan, adjusted)


def run_time(series: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The autocorrelation of a run's series averaged over its sources (over the lags all of them have), and
    tau and the kept lags from it."""
    usable = [s for s in series if len(s) >= 2]
    if not usable:
        return np.ones(1), np.ones(()), np.ones((), dtype=np.int64)
    n = min(len(s) for s in usable)
    rho = np.mean([autocorrelation(detrend(np.asarray(s, dtype=np.float64)))[:n] for s in usable], axis=0)
    tau, lags = integrated_time(rho)
    return rho, tau, lags


def evaluate(advantages: list[np.ndarray], contrasts: list[np.ndarray], min_batch: int = 1,
             level: float = DEFAULT_LEVEL) -> list[dict[str, Any]]:
    """Per source of one run: its advantage (mean, stderr, z: CONTRACT v3), its contrast (mean, stderr, t) and
    from the contrast p (Holm-adjusted over the run's sources) and the verdict; the steps and the batches behind
    them (`batches`, `batch_steps`, `autocorrelation_time`, in lam steps; one batch length for both series)."""
    rho, tau, lags = run_time(contrasts)
    b = int(batch_length(tau, min_batch))
    out, raw = [], []
    for a, c in zip(advantages, contrasts):
        a, c = np.asarray(a, dtype=np.float64), np.asarray(c, dtype=np.float64)
        e: dict[str, Any] = {"steps": len(a)}
        e |= _tested(a, b, rho, lags, tau, ("advantage", "stderr", "z"))
        e |= _tested(c, b, rho, lags, tau, ("contrast", "contrast_stderr", "t"))
        e["batches"] = e.pop("_batches")
        raw.append(e.pop("_p"))
        out.append(e)
    adjusted = holm(np.asarray(raw, dtype=np.float64))
    for e, p in zip(out, adjusted.tolist()):
        e["p"] = None if math.isnan(p) else p
        e["verdict"] = verdict(e["contrast"], e["p"], level)
        e["batch_steps"] = b
        e["autocorrelation_time"] = float(tau)
    return out


def _tested(x: np.ndarray, b: int, rho: np.ndarray, lags: np.ndarray, tau: np.ndarray,
            keys: tuple[str, str, str]) -> dict[str, Any]:
    """{mean, stderr, mean / stderr} of one series under `keys`, plus its unadjusted p and batch count (`_p`,
    `_batches`); stderr and the ratio are None with fewer than MIN_BATCHES batches (no error worth reporting)."""
    mean_key, err_key, ratio_key = keys
    if len(x) < 2:
        return {mean_key: float(x.mean()) if len(x) else None, err_key: None, ratio_key: None,
                "_p": np.nan, "_batches": 0}
    r = batch_t(x, b, rho, lags, tau)
    ratio, enough = float(r["z"]), r["batches"] >= MIN_BATCHES
    return {mean_key: float(r["mean"]), err_key: float(r["stderr"]) if enough else None,
            ratio_key: ratio if enough and math.isfinite(ratio) else None, "_p": float(r["p"]),
            "_batches": int(r["batches"])}


def evaluate_many(a: np.ndarray, min_batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`evaluate`'s test for R runs at once, each of K equally long series (the contrasts): a is (R, K, n).
    Returns the Holm-adjusted p (R, K; NaN where a run is too short) and the means (R, K). What
    tests/test_verdict.py simulates."""
    rho = autocorrelation(detrend(a)).mean(axis=1)
    tau, lags = integrated_time(rho)
    b = batch_length(tau, min_batch)
    p = np.full(a.shape[:2], np.nan)
    for length in np.unique(b):
        rows = np.flatnonzero(b == length)
        r = batch_t(a[rows], int(length), rho[rows, None], lags[rows, None], tau[rows, None])
        p[rows] = r["p"]
    return holm(p), a.mean(axis=-1)


def verdict(contrast: float | None, p: float | None, level: float) -> str:
    if p is None or contrast is None or p >= level or contrast == 0:
        return "unclear"
    return "raised" if contrast > 0 else "lowered"


def steps_for_verdict(evidence: dict[str, dict[str, Any]], level: float, every: int = 1) -> int | None:
    """Roughly how many more lam steps x `every` (training steps) would turn the unclear sources of a run into
    verdicts: MIN_BATCHES batches when the run had fewer; else the steps at which the largest observed |z| would
    reach the adjusted critical t (t grows as sqrt(steps)). None when no source could (a zero contrast)."""
    unclear = [e for e in evidence.values() if e.get("verdict") == "unclear" and e.get("steps")]
    if not unclear:
        return None
    batch = max(int(e.get("batch_steps") or 1) for e in unclear)
    need = MIN_BATCHES * batch
    steps = max(int(e["steps"]) for e in unclear)
    zs = [abs(e["t"]) for e in unclear if e.get("t")]
    if steps >= need and zs:
        critical = t_quantile(level / len(evidence), max(MIN_BATCHES, steps // batch) - 1)
        need = math.ceil(steps * (critical / max(zs)) ** 2)
    return max(need, steps) * every
