"""A reweight run's report page: its charts (weights, L1, per-source losses of u and w, lambda gradients, learning
rates; smoothed, raw points faint behind), the weights, truncation and evidence tables, an evaluation table and
chart, and the page around them (stages/report.py reads the run and writes the page).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

# -- charts ------------------------------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(title: str, ylabel: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


RAW_ALPHA = 0.25  # raw points stay visible, faint, under their smoothed curve


def smooth(values: list[Any], span: int | None = None) -> list[float]:
    """An exponential moving average (span ~ a tenth of the points, at least 1): the trend through noisy steps.
    Missing values (None, NaN) are carried over, never averaged in."""
    import math

    span = span or max(1, len(values) // 10)
    alpha = 2 / (span + 1)
    out: list[float] = []
    level: float | None = None
    for v in values:
        if isinstance(v, (int, float)) and math.isfinite(v):
            level = float(v) if level is None else alpha * float(v) + (1 - alpha) * level
        out.append(float("nan") if level is None else level)
    return out


def _plot(ax: Any, steps: list[int], values: list[Any], **style: Any) -> None:
    """The smoothed curve, with the raw points faint behind it (one legend entry: the smoothed one)."""
    (line,) = ax.plot(steps, smooth(values), **style)
    if len(steps) >= 5:
        raw = [float("nan") if v is None else v for v in values]
        ax.plot(steps, raw, color=line.get_color(), linestyle=style.get("linestyle", "-"), alpha=RAW_ALPHA,
                linewidth=0.8)


def _per_source(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], dict[str, list[float]]]:
    rows = [m for m in metrics if isinstance(m.get(key), dict)]
    names = list(rows[0][key]) if rows else []
    return [m["step"] for m in rows], {n: [m[key].get(n, float("nan")) for m in rows] for n in names}


def charts(doc: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, str]:
    """Title -> base64 PNG, for every chart the run has data for."""
    out: dict[str, str] = {}
    traj = doc.get("trajectory") or []
    if traj and isinstance(traj[0].get("weights"), dict):  # metrics' weight points, plus step 0 (uniform)
        steps, weights = [p["step"] for p in traj], {n: [p["weights"][n] for p in traj] for n in traj[0]["weights"]}
    else:
        steps, weights = _per_source(metrics, "weights")
    if steps:
        fig, ax = _figure("Source weights over steps", "sampling weight")
        for name, values in weights.items():
            _plot(ax, steps, values, label=name, linewidth=1.8)
        ax.axhline(1 / max(1, len(weights)), color="grey", linestyle=":", linewidth=1, label="uniform")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        out["Source weights over steps"] = _png(fig)
    rows = [m for m in metrics if "L1" in m]
    if rows:
        fig, ax = _figure("Objectives", "loss")
        for key, label in (("L1", "L1 (validation, w)"), ("L2_u", "L2(u)"), ("L2_w", "L2(w)")):
            _plot(ax, [m["step"] for m in rows], [m.get(key) for m in rows], label=label)
        ax.legend(fontsize=8)
        out["Objectives"] = _png(fig)
    out.update(_loss_lambda_lr_charts(metrics))
    return out


def _loss_lambda_lr_charts(metrics: list[dict[str, Any]]) -> dict[str, str]:
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    steps, loss_u = _per_source(metrics, "loss_u")
    _, loss_w = _per_source(metrics, "loss_w")
    if steps:
        fig, ax = _figure("Per-source training loss of u (solid) and w (dashed)", "mean loss")
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, name in enumerate(loss_u):
            _plot(ax, steps, loss_u[name], color=colors[i % len(colors)], label=f"{name} u")
            if name in loss_w:
                _plot(ax, steps, loss_w[name], color=colors[i % len(colors)], linestyle="--", label=f"{name} w")
        ax.legend(fontsize=7, ncol=2)
        out["Per-source losses"] = _png(fig)
    steps, grads = _per_source(metrics, "lambda_grad")
    if steps:
        fig, ax = _figure("Gradient of the weight logits (lambda)", "d objective / d lambda")
        for name, values in grads.items():
            ax.plot(steps, values, label=name)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.legend(fontsize=8)
        out["Lambda gradients"] = _png(fig)
    rows = [m for m in metrics if any(k in m for k in ("lr_u", "lr_w", "lr_lambda"))]
    if rows:
        fig, ax = _figure("Learning rates", "learning rate")
        for key in ("lr_u", "lr_w", "lr_lambda"):
            if any(isinstance(m.get(key), (int, float)) for m in rows):
                ax.plot([m["step"] for m in rows], [m.get(key) for m in rows], label=key)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        out["Learning rates"] = _png(fig)
    return out


def eval_chart(evals: dict[str, dict[str, Any]]) -> str | None:
    """Grouped bars: held-out loss (and accuracy where measured) per data file, one bar per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    datasets = list(dict.fromkeys(d for doc in evals.values() for d in doc["results"]))
    if not datasets:
        return None
    has_acc = any("accuracy" in r for doc in evals.values() for r in doc["results"].values())
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(9 if has_acc else 6, 3.6), dpi=110, squeeze=False)
    width = 0.8 / len(evals)
    for col, (metric, label) in enumerate([("loss", "held-out loss"), ("accuracy", "accuracy")][: 1 + has_acc]):
        ax = axes[0][col]
        for i, (name, doc) in enumerate(evals.items()):
            values = [doc["results"].get(d, {}).get(metric, float("nan")) for d in datasets]
            ax.bar(np.arange(len(datasets)) + i * width, [np.nan if v is None else v for v in values], width,
                   label=name)
        ax.set_xticks(np.arange(len(datasets)) + width * (len(evals) - 1) / 2, datasets)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    return _png(fig)


# -- the page ----------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def weights_table(doc: dict[str, Any]) -> str:
    averaged = doc.get("weights_averaged") or {}
    sources = doc.get("sources") or {}
    shares = truncation_shares(doc)
    flagged = bool(truncation_note(doc))

    def share(name: str) -> str:
        return f" ({shares[name]:.0%})" if shares.get(name, 0) > 0 else ""

    def flag(name: str) -> str:
        return '"n warn"' if flagged and shares.get(name, 0) - min(shares.values()) > TRUNCATION_SPREAD else "n"

    rows = []
    for name, weight in doc["weights"].items():
        info = sources.get(name) or {}
        rows.append(f"<tr><td>{html.escape(name)}</td><td class=n>{_fmt(weight)}</td>"
                    f"<td class=n>{_fmt(averaged.get(name))}</td><td class=n>{_fmt(info.get('num_examples'))}</td>"
                    f"<td class=n>{_fmt(info.get('num_trainable'))}</td>"
                    f"<td class={flag(name)}>{_fmt(info.get('num_truncated'))}{share(name)}</td>"
                    f"<td class=p>{html.escape(str(info.get('path', '-')))}</td></tr>")
    return ("<table><tr><th>source</th><th>weight</th><th>averaged</th><th>records</th><th>trainable</th>"
            "<th>truncated</th><th>file</th></tr>" + "".join(rows) + "</table>")


TRUNCATION_SPREAD = 0.05  # truncated shares that differ by more than this between sources are flagged


def truncation_shares(doc: dict[str, Any]) -> dict[str, float]:
    """Each source's share of records cut by data.max_length (over the records tokenized), where recorded."""
    shares = {}
    for name, info in (doc.get("sources") or {}).items():
        if not isinstance(info, dict):
            continue
        cut, total = info.get("num_truncated"), info.get("num_tokenized", info.get("num_examples"))
        if isinstance(cut, int) and isinstance(total, int) and total > 0:
            shares[name] = cut / total
    return shares


def truncation_note(doc: dict[str, Any]) -> str:
    """A warning when truncation differs a lot between sources (it confounds the weights), else ""."""
    shares = truncation_shares(doc)
    if len(shares) < 2 or max(shares.values()) - min(shares.values()) <= TRUNCATION_SPREAD:
        return ""
    most, least = max(shares, key=shares.__getitem__), min(shares, key=shares.__getitem__)
    listed = ", ".join(f"{html.escape(n)} {v:.0%}" for n, v in sorted(shares.items(), key=lambda kv: -kv[1]))
    return (f"<p class=warn><b>Truncation differs between sources</b> ({listed}): a cut record loses its end, "
            f"often the answer, and so its loss changes. The weight of {html.escape(most)} against "
            f"{html.escape(least)} may reflect data.max_length rather than the data: raise data.max_length "
            "(or filter long records) and compare.</p>")


def evidence_table(doc: dict[str, Any]) -> str:
    """weights.json `evidence` (how sure the run is of each source's direction): a table, when the run has it,
    with the placebo's row (`placebo`) and whether the weights settled (`settled`) where the file has them."""
    evidence = doc.get("evidence")
    if not isinstance(evidence, dict) or not evidence:
        return ""
    control = doc.get("placebo") if isinstance(doc.get("placebo"), dict) else None
    shown = dict(evidence)
    if control is not None and isinstance(control.get("evidence"), dict):
        shown[f"{control.get('name', 'placebo')} (placebo: half of {control.get('split_from', '?')})"] = \
            control["evidence"]
    rows = [_evidence_row(name, e if isinstance(e, dict) else {}) for name, e in shown.items()]
    level = doc.get("evidence_level") if any(isinstance(e, dict) and "verdict" in e for e in shown.values()) else None
    rule = (f"p: two-sided, Holm-adjusted over the run's sources; <b>a verdict (raised, lowered) at p &lt; "
            f"{html.escape(str(level))}, else unclear</b> (also when the run had too few batches of steps to "
            "estimate the error)" if level is not None else "<b>|z| &lt; 2: the run cannot tell this source from "
            "the mixture.</b>")
    settled = doc.get("settled")
    still = ([n for n, ok in settled.get("by_source", {}).items() if not ok]
             if isinstance(settled, dict) else [])
    moving = (f"<p class=meta><b>Weights still moving:</b> {html.escape(', '.join(map(str, still)))} (more steps, "
              "weights_averaged, or a decaying lam rate)</p>" if still else "")
    return ("<h2>Evidence</h2><table><tr><th>source</th><th>advantage</th><th>stderr</th><th>z</th>"
            "<th>vs the rest</th><th>t</th><th>p</th><th>steps</th><th>verdict</th></tr>" + "".join(rows) +
            "</table><p class=meta>advantage: the mean of the source's centred paired difference over the steps in "
            "which lambda moved (positive: the direction in which lambda raises the source); stderr from batches "
            "of steps longer than their correlation; z = advantage / stderr. vs the rest: the same against the "
            "other sources (a placebo: against the source it was split from), which keeps its size as a source's "
            f"weight nears 1; t = it / its stderr, and p tests it; {rule}.</p>" + moving)


def _evidence_row(name: str, e: dict[str, Any]) -> str:
    z = e.get("z")
    known = isinstance(z, (int, float)) and not isinstance(z, bool)
    if "verdict" in e:
        reading = str(e["verdict"])
        weak = reading == "unclear"
    elif known and abs(z) >= 2:
        reading, weak = ("raised" if z > 0 else "lowered"), False
    else:
        reading, weak = ("cannot tell from the mixture" if known else "-"), known
    cls = " class=weak" if weak else ""
    return (f"<tr{cls}><td>{html.escape(str(name))}</td><td class=n>{_fmt(e.get('advantage'))}</td>"
            f"<td class=n>{_fmt(e.get('stderr'))}</td><td class=n>{_fmt(z, 2)}</td>"
            f"<td class=n>{_fmt(e.get('contrast'))}</td><td class=n>{_fmt(e.get('t'), 2)}</td>"
            f"<td class=n>{_fmt(e.get('p'))}</td><td class=n>{_fmt(e.get('steps'))}</td>"
            f"<td>{html.escape(reading)}</td></tr>")


def eval_table(evals: dict[str, dict[str, Any]]) -> str:
    datasets = list(dict.fromkeys(d for doc in evals.values() for d in doc["results"]))
    head = "".join(f"<th colspan=3>{html.escape(d)}</th>" for d in datasets)
    sub = "<th>loss</th><th>perplexity</th><th>accuracy</th>" * len(datasets)
    rows = []
    for name, doc in evals.items():
        cells = []
        for d in datasets:
            r = doc["results"].get(d, {})
            cells.append(f"<td class=n>{_fmt(r.get('loss'))}</td><td class=n>{_fmt(r.get('perplexity'), 3)}</td>"
                         f"<td class=n>{_fmt(r.get('accuracy'), 3)}</td>")
        rows.append(f"<tr><td>{html.escape(name)}<div class=p>{html.escape(str(doc.get('model', '')))}</div></td>"
                    + "".join(cells) + "</tr>")
    return f"<table><tr><th rowspan=2>result</th>{head}</tr><tr>{sub}</tr>{''.join(rows)}</table>"


STYLE = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:13px}.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #e4e4e4;border-radius:6px;padding:6px;background:#fff}
figure img{width:560px;display:block}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px}
th{background:#f4f4f4}.n{text-align:right;font-variant-numeric:tabular-nums}.p{color:#777;font-size:11px}
.warn{background:#fff3cd}p.warn{border:1px solid #f0d98c;padding:6px 10px;border-radius:4px}tr.weak td{color:#888}
pre{background:#f7f7f7;border:1px solid #e4e4e4;padding:10px;font-size:12px;overflow:auto;max-height:420px}"""


def page(doc: dict[str, Any], images: dict[str, str], recipe: str, evals: dict[str, dict[str, Any]],
         eval_png: str | None, run_dir: Path) -> str:
    from scalebio_cli.grouping.report import groups_section  # groups of `scalebio group`: weights per group

    figures = "".join(f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{b64}"></figure>'
                      for t, b64 in images.items())
    meta = (f"{html.escape(str(run_dir))} · model {html.escape(str(doc.get('model', '-')))} · "
            f"{_fmt(doc.get('steps'))} steps · seed {_fmt(doc.get('seed'))} · created "
            f"{html.escape(str(doc.get('created', '-')))} · scalebio {html.escape(str(doc.get('version', '-')))}")
    evaluation = ""
    if evals:
        chart = (f'<figure><img alt="evaluation" src="data:image/png;base64,{eval_png}"></figure>'
                 if eval_png else "")
        evaluation = f"<h2>Evaluation</h2>{eval_table(evals)}<div class=grid>{chart}</div>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>scalebio report: {html.escape(run_dir.name)}</title>
<style>{STYLE}</style></head><body>
<h1>ScaleBiO run report</h1><div class=meta>{meta}</div>
<h2>Weights</h2>{weights_table(doc)}
<p class=meta>averaged: the mean over the second half of the run; truncated: records cut by data.max_length
("-" where the weights file does not record it).</p>
{truncation_note(doc)}
{evidence_table(doc)}
{groups_section(doc)}
<h2>Training curves</h2><div class=grid>{figures}</div>
<p class=meta>Curves: an exponential moving average (span: a tenth of the points); the raw points are the faint
lines behind them.</p>
{evaluation}
<h2>Recipe</h2><pre>{html.escape(recipe)}</pre>
</body></html>
"""
