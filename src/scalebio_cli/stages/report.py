"""`scalebio report`: one self-contained HTML page of a reweight run (no network: charts are inlined PNGs).

Reads what the run left behind: metrics.jsonl (weights, L1 and the per-source losses of u and w, lambda gradients,
learning rates over the steps), weights.json (final and averaged weights, source sizes and truncation, the
resolved recipe) and recipe.yaml; with `--eval NAME=RESULT.json` (files written by `scalebio eval`) a side-by-side
table and bar chart of held-out loss and accuracy.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import yaml

from scalebio_cli.errors import InputError
from scalebio_cli.files import write_text

WEIGHTS_FORMAT = "scalebio-weights/1"


# -- reading the run ---------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: {what} is not valid JSON ({exc})") from None


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """(weights.json, metrics lines, recipe YAML text) of a reweight run folder."""
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: run folder not found")
    doc = _read_json(run_dir / "weights.json", "weights.json (is this the output_dir of `scalebio reweight`?)")
    if not isinstance(doc, dict) or doc.get("format") != WEIGHTS_FORMAT or not isinstance(doc.get("weights"), dict):
        raise InputError(f"{run_dir / 'weights.json'}: not a weights file of format {WEIGHTS_FORMAT!r}")
    metrics: list[dict[str, Any]] = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    metrics.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    recipe_file = run_dir / "recipe.yaml"
    recipe = (recipe_file.read_text(encoding="utf-8") if recipe_file.is_file()
              else yaml.safe_dump(doc.get("config") or {}, sort_keys=False))
    return doc, metrics, recipe


def read_evals(evals: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, file in evals.items():
        doc = _read_json(Path(file), f"--eval {name}: result file")
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
            raise InputError(f"--eval {name}: {file} is not a result of `scalebio eval` (no 'results')")
        out[name] = doc
    return out


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
            ax.plot(steps, values, label=name, linewidth=1.8)
        ax.axhline(1 / max(1, len(weights)), color="grey", linestyle=":", linewidth=1, label="uniform")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        out["Source weights over steps"] = _png(fig)
    rows = [m for m in metrics if "L1" in m]
    if rows:
        fig, ax = _figure("Objectives", "loss")
        for key, label in (("L1", "L1 (validation, w)"), ("L2_u", "L2(u)"), ("L2_w", "L2(w)")):
            ax.plot([m["step"] for m in rows], [m.get(key) for m in rows], label=label)
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
            ax.plot(steps, loss_u[name], color=colors[i % len(colors)], label=f"{name} u")
            if name in loss_w:
                ax.plot(steps, loss_w[name], color=colors[i % len(colors)], linestyle="--", label=f"{name} w")
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
    rows = []
    for name, weight in doc["weights"].items():
        info = sources.get(name) or {}
        rows.append(f"<tr><td>{html.escape(name)}</td><td class=n>{_fmt(weight)}</td>"
                    f"<td class=n>{_fmt(averaged.get(name))}</td><td class=n>{_fmt(info.get('num_examples'))}</td>"
                    f"<td class=n>{_fmt(info.get('num_trainable'))}</td>"
                    f"<td class=n>{_fmt(info.get('num_truncated'))}</td>"
                    f"<td class=p>{html.escape(str(info.get('path', '-')))}</td></tr>")
    return ("<table><tr><th>source</th><th>weight</th><th>averaged</th><th>records</th><th>trainable</th>"
            "<th>truncated</th><th>file</th></tr>" + "".join(rows) + "</table>")


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
pre{background:#f7f7f7;border:1px solid #e4e4e4;padding:10px;font-size:12px;overflow:auto;max-height:420px}"""


def page(doc: dict[str, Any], images: dict[str, str], recipe: str, evals: dict[str, dict[str, Any]],
         eval_png: str | None, run_dir: Path) -> str:
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
<h2>Training curves</h2><div class=grid>{figures}</div>
{evaluation}
<h2>Recipe</h2><pre>{html.escape(recipe)}</pre>
</body></html>
"""


def run(run_dir: Path, output: Path | None = None, evals: dict[str, str] | None = None) -> Path:
    """Write RUN/report.html (or `output`); returns its path. A `scalebio compare` folder gets its own page."""
    if (run_dir / "compare.json").is_file():
        from scalebio_cli.results import compare_report

        return compare_report.render(run_dir, output)
    doc, metrics, recipe = read_run(run_dir)
    results = read_evals(evals or {})
    output = output or run_dir / "report.html"
    text = page(doc, charts(doc, metrics), recipe, results, eval_chart(results) if results else None, run_dir)
    write_text(output, text)
    from rich.markup import escape

    from scalebio_cli.console import console

    console.print(f"[bold green]report[/] {len(text) / 1024:,.0f} KiB, self-contained: {escape(str(output))}")
    return output
