"""Whether a run's weights have settled (CONTRACT v4 `settled`), from the weights after every lam step.

With Adam on lam, a weight moves by about lr_lambda (in log space) per step for as long as the sign of its
gradient holds, so where a run ends is set by steps x lr_lambda as much as by the data (issue 43): a weight still
on its way reads like a mixture but is not one. The rule, per source, in log-weights (a weight of 0.005 going to
0.003 moves as much as 0.5 going to 0.3): over the last quarter of the lam steps its change is
- no more than twice what that quarter's step-to-step changes explain as a random walk (std x sqrt(count): no
  trend beyond the run's noise), or
- at most FRACTION of the furthest the weight got from where it started (the trajectory levelled off; a weight
  still moving in a straight line, however slowly, made a quarter of its way in the last quarter).
A run with fewer than MIN_STEPS lam steps has not shown that it settled.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

FRACTION = 0.1
MIN_STEPS = 20

RULE = ("a source has settled when, over the last quarter of the lam steps, its log-weight changed by no more than "
        "twice the random-walk spread of that quarter's step-to-step changes, or by at most "
        f"{FRACTION:g} of the furthest it got from its start; at least {MIN_STEPS} lam steps")


def settled(history: list[list[float]], names: list[str]) -> dict[str, Any]:
    """weights.json `settled`: {"all": bool, "by_source": {NAME: bool}, "rule": RULE, "change": {NAME: change of
    log weight over the last quarter}, "lam_steps": N} from the weights after each lam step (rows) of each source
    (columns)."""
    if len(history) < MIN_STEPS:
        return {"all": False, "by_source": dict.fromkeys(names, False), "rule": RULE, "change": {},
                "lam_steps": len(history)}
    logs = np.log(np.clip(np.asarray(history, dtype=np.float64), 1e-300, None))
    window = logs[-(len(logs) // 4) - 1:]
    change = window[-1] - window[0]
    steps = np.diff(window, axis=0)
    noise = steps.std(axis=0, ddof=1) * math.sqrt(len(steps))
    furthest = np.abs(logs - logs[0]).max(axis=0)
    ok = np.abs(change) <= np.maximum(2 * noise, FRACTION * furthest)
    by_source = {n: bool(v) for n, v in zip(names, ok)}
    return {"all": all(by_source.values()), "by_source": by_source, "rule": RULE,
            "change": {n: float(c) for n, c in zip(names, change)}, "lam_steps": len(history)}


def advice(state: dict[str, Any], schedule: str) -> str | None:
    """The log's line for a run that has not settled: which sources still move and what to do."""
    if state["all"]:
        return None
    moving = [n for n, ok in state["by_source"].items() if not ok]
    if not state["change"]:
        where = f"only {state['lam_steps']} lam steps: too few to tell whether they settled"
    else:
        where = ", ".join(f"{n} {math.expm1(state['change'][n]):+.0%}" for n in moving) + " over the last quarter"
    todo = ["more steps (how far a weight gets is set by steps x lr_lambda)",
            "read `weights_averaged` (sample/export --averaged)"]
    if schedule != "cosine":
        todo.append("`reweight.lambda_schedule: cosine` (a decaying lam rate)")
    return f"weights still moving ({where}): " + "; ".join(todo)
