"""Weights that say whether they settled (CONTRACT v4 `settled`, train/settled.py): from the weights after every
lam step. A short demo run has not settled (tests/test_placebo.py checks the file and the log); the long demo run
with its decaying lam rate has (tests/test_placebo.py, slow)."""

from __future__ import annotations

import numpy as np

from scalebio_cli.train.settled import MIN_STEPS, advice, settled


def softmax_rows(lam: np.ndarray) -> list[list[float]]:
    e = np.exp(lam - lam.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).tolist()


def test_a_weight_still_moving_in_a_straight_line_has_not_settled() -> None:
    """Adam with a gradient sign that holds: lam moves by lr every step, however small lr is."""
    steps = np.arange(1, 101)[:, None]
    for lr in (0.05, 0.002):
        state = settled(softmax_rows(np.hstack([lr * steps, 0 * steps, -lr * steps])), ["a", "b", "c"])
        # the shrinking weight keeps shrinking by the same factor (a weight near 1 saturates and may settle)
        assert not state["all"] and not state["by_source"]["c"] and state["change"]["c"] < 0
        assert state["by_source"]["a"] is (lr > 0.01)
    line = advice(state, "constant")
    assert "more steps" in line and "weights_averaged" in line and "lambda_schedule: cosine" in line
    assert "lambda_schedule" not in advice(state, "cosine")


def test_a_levelled_off_or_random_walk_trajectory_has_settled() -> None:
    t = np.arange(200)[:, None]
    plateau = np.hstack([1 - np.exp(-t / 20), 0 * t, -(1 - np.exp(-t / 20))])
    state = settled(softmax_rows(plateau), ["a", "b", "c"])
    assert state["all"] and advice(state, "constant") is None
    rng = np.random.default_rng(0)
    calls = [settled(softmax_rows(np.cumsum(rng.normal(0, 0.02, (200, 3)), axis=0)), ["a", "b", "c"])["all"]
             for _ in range(50)]
    assert np.mean(calls) > 0.5  # no trend beyond the noise: most random walks count as settled


def test_too_few_lam_steps_have_not_shown_it() -> None:
    state = settled(softmax_rows(np.zeros((MIN_STEPS - 1, 2))), ["a", "b"])
    assert state["all"] is False and state["by_source"] == {"a": False, "b": False}
    assert "too few" in advice(state, "cosine") and state["rule"]
