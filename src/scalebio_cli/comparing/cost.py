"""What producing a mix cost before compare's own fine-tunings: a reweight run's time and tokens (its
metrics.jsonl), a `select` run's (its manifest), or nothing for a fixed rule; in units of one fine-tuning too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scalebio_cli.comparing.mixes import KEYWORDS, Mix
from scalebio_cli.results import reuse


def _reweight_cost(run: Path) -> dict[str, Any]:
    """A reweight run's wall time and tokens from its metrics.jsonl (sec_per_step and tokens_per_s of its lines)."""
    rows = []
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if (run / "metrics.jsonl").is_file() \
            else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("sec_per_step"), (int, float)) and row.get("step"):
            rows.append(row)
    if not rows:
        return {"seconds": None, "tokens": None, "what": f"reweight run {run}: no timed metrics.jsonl lines"}
    tokens, previous = 0.0, 0
    for row in rows:
        tokens += float(row.get("tokens_per_s") or 0) * float(row["sec_per_step"]) * (row["step"] - previous)
        previous = row["step"]
    return {"seconds": round(float(rows[-1]["sec_per_step"]) * rows[-1]["step"], 1), "tokens": int(tokens),
            "what": f"reweight run {run} ({rows[-1]['step']} steps; metrics.jsonl's sec_per_step x steps)"}


def _file_cost(path: Path) -> dict[str, Any]:
    """What made a record file, from its manifest: `select` (its timed seconds) or `sample` of a weights file (that
    reweight run)."""
    manifest = reuse.read_json(path.with_name(path.stem + ".manifest.json"))
    if not isinstance(manifest, dict):
        return {"seconds": None, "tokens": None, "what": f"unknown: {path} has no manifest beside it"}
    if manifest.get("method"):
        seconds = manifest.get("seconds")
        what = f"select --method {manifest['method']}" + ("" if seconds is not None else
                                                           " (its manifest records no time: an earlier version)")
        return {"seconds": seconds, "tokens": manifest.get("tokens"), "what": what}
    weights = manifest.get("weights_file")
    if weights and Path(weights).is_file():
        cost = _reweight_cost(Path(weights).parent)
        return _plus_scores(cost, manifest.get("rank_by")) if manifest.get("rank_by") else cost
    return {"seconds": None, "tokens": None, "what": f"unknown: the manifest of {path} names no producer"}


def _plus_scores(cost: dict[str, Any], scores: str) -> dict[str, Any]:
    """A ranked sample (`sample --rank-by`) cost its weights' reweight run plus the `select` that wrote the scores
    (the manifest beside it whose scores_file is this file)."""
    for path in sorted(Path(scores).parent.glob("*.manifest.json")):
        manifest = reuse.read_json(path)
        if isinstance(manifest, dict) and manifest.get("method") and manifest.get("scores_file") == scores:
            seconds = manifest.get("seconds")
            total = None if seconds is None or cost["seconds"] is None else cost["seconds"] + seconds
            return {"seconds": total, "tokens": cost["tokens"],
                    "what": f"{cost['what']} + select --method {manifest['method']} (its scores)"}
    return {"seconds": None, "tokens": None, "what": f"{cost['what']} + the scores {scores} (no select manifest "
                                                       "names them)"}


def mix_cost(mix: Mix, finetune_seconds: float) -> dict[str, Any]:
    """What producing the mix cost before compare's own fine-tunings: seconds, tokens, and the seconds in units of
    one fine-tuning of the mix (`fine_tunes`)."""
    if mix.kind in (*KEYWORDS, "source"):
        cost: dict[str, Any] = {"seconds": 0.0, "tokens": 0, "what": f"{mix.kind}: a fixed rule, nothing to learn"}
    elif mix.kind == "weights":
        cost = _reweight_cost(Path(mix.spec).parent)
    else:
        cost = _file_cost(Path(mix.spec))
    seconds = cost["seconds"]
    cost["fine_tunes"] = (None if seconds is None or finetune_seconds <= 0 else round(seconds / finetune_seconds, 3))
    return {k: cost[k] for k in ("seconds", "tokens", "fine_tunes", "what")}
