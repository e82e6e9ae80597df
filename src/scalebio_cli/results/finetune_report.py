"""The page `scalebio report RUN` writes for a finetune run: the training loss per source and the validation loss
per set over the steps (one curve each), their first and last values, and the recipe. Self-contained HTML (charts
are inlined PNGs), read from what the run left: metrics.jsonl and recipe.yaml."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from scalebio_cli.errors import InputError
from scalebio_cli.files import did_you_mean, write_text

RAW_ALPHA = 0.25  # raw points stay visible, faint, under their smoothed curve (as on the reweight page)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                lines.append(record)
    return lines


def is_finetune_run(folder: Path) -> bool:
    """A folder with finetune's metrics (training `loss` lines) and no reweight result."""
    path = folder / "metrics.jsonl"
    if (folder / "weights.json").is_file() or not path.is_file():
        return False
    try:
        lines = read_metrics(path)
    except InputError:
        return False
    return any("loss" in m for m in lines) and not any("L1" in m for m in lines)


def series(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], dict[str, list[float]]]:
    """Steps and one series per name of the lines that carry `key`: a mapping's names, or `key` for a number."""
    rows = [m for m in metrics if isinstance(m.get(key), (dict, int, float)) and not isinstance(m.get(key), bool)]
    names: list[str] = []
    for m in rows:
        names += [n for n in (m[key] if isinstance(m[key], dict) else [key]) if n not in names]

    def value(m: dict[str, Any], name: str) -> float:
        v = m[key].get(name) if isinstance(m[key], dict) else m[key]
        return float(v) if isinstance(v, (int, float)) else math.nan

    return [m["step"] for m in rows], {n: [value(m, n) for m in rows] for n in names}


def smooth(values: list[float]) -> list[float]:
    """An exponential moving average (span a tenth of the points); missing values are carried over."""
    alpha = 2 / (max(1, len(values) // 10) + 1)
    out, level = [], math.nan
    for v in values:
        if math.isfinite(v):
            level = v if math.isnan(level) else alpha * v + (1 - alpha) * level
        out.append(level)
    return out


def chart(title: str, ylabel: str, steps: list[int], curves: dict[str, list[float]],
          overall: list[float] | None = None, log_y: bool = False) -> str:
    """One line per curve (smoothed, raw points faint behind), `overall` as a dashed grey line; a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for name, values in curves.items():
        (line,) = ax.plot(steps, smooth(values), label=name, linewidth=1.8, marker="o" if len(steps) < 5 else None)
        if len(steps) >= 5:
            ax.plot(steps, values, color=line.get_color(), alpha=RAW_ALPHA, linewidth=0.8)
    if overall is not None:
        ax.plot(steps, smooth(overall), color="#555", linestyle="--", linewidth=1.2, label="all (the batch)")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def first_last_table(label: str, curves: dict[str, list[float]]) -> str:
    """Per name: its first and last measured value and the change."""
    rows = []
    for name, values in curves.items():
        seen = [v for v in values if math.isfinite(v)]
        first, last = (seen[0], seen[-1]) if seen else (None, None)
        change = None if first is None or last is None else last - first
        rows.append(f"<tr><td>{html.escape(name)}</td><td class=n>{_fmt(first)}</td><td class=n>{_fmt(last)}</td>"
                    f"<td class=n>{'-' if change is None else f'{change:+.4f}'}</td></tr>")
    return (f"<table><tr><th>{html.escape(label)}</th><th>first</th><th>last</th><th>change</th></tr>"
            + "".join(rows) + "</table>")


def charts(metrics: list[dict[str, Any]]) -> dict[str, str]:
    """Title -> base64 PNG, for every chart the run has data for."""
    out: dict[str, str] = {}
    steps, by_source = series(metrics, "train_loss_by_source")
    if steps:
        overall = {m["step"]: m.get("loss") for m in metrics if "train_loss_by_source" in m}
        out["Training loss per source"] = chart("Training loss per source", "mean response-token loss", steps,
                                                by_source, [float(overall[s]) for s in steps])
    else:
        steps, loss = series(metrics, "loss")
        if steps:
            out["Training loss"] = chart("Training loss", "mean response-token loss", steps, loss)
    steps, val = series(metrics, "val_loss")
    if steps:
        out["Validation loss per set"] = chart("Validation loss per set", "mean response-token loss", steps, val)
    steps, lr = series(metrics, "lr")
    if steps:
        out["Learning rate"] = chart("Learning rate", "learning rate", steps, lr, log_y=True)
    return out


STYLE = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:13px}.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #e4e4e4;border-radius:6px;padding:6px;background:#fff}figure img{width:560px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px}
th{background:#f4f4f4}.n{text-align:right;font-variant-numeric:tabular-nums}.p{color:#777;font-size:11px}
pre{background:#f7f7f7;border:1px solid #e4e4e4;padding:10px;font-size:12px;overflow:auto;max-height:420px}"""


def page(folder: Path, metrics: list[dict[str, Any]], recipe: str, eval_html: str = "") -> str:
    images = charts(metrics)
    figures = "".join(f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{b64}"></figure>'
                      for t, b64 in images.items())
    config = _recipe_tree(recipe)
    last = max((m["step"] for m in metrics), default=0)
    meta = (f"{html.escape(str(folder))} · model {html.escape(str(config.get('model', '-')))} · {last:,} steps "
            f"logged · seed {html.escape(str(config.get('seed', '-')))}")
    tables = []
    _, by_source = series(metrics, "train_loss_by_source")
    if by_source:
        tables.append("<h3>Training loss per source</h3>" + first_last_table("source", by_source)
                      + "<p class=meta>Each source's token-weighted mean loss within the global batch of a log step "
                        "(a source absent from that batch has no point there).</p>")
    _, val = series(metrics, "val_loss")
    if val:
        tables.append("<h3>Validation loss per set</h3>" + first_last_table("set", val))
    evaluation = f"<h2>Evaluation</h2>{eval_html}" if eval_html else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>scalebio report: {html.escape(folder.name)}</title>
<style>{STYLE}</style></head><body>
<h1>Fine-tuning run report</h1><div class=meta>{meta}</div>
<h2>Curves</h2><div class=grid>{figures}</div>
<p class=meta>Curves: an exponential moving average (span: a tenth of the points); the raw points are the faint
lines behind them.</p>
{''.join(tables)}
{evaluation}
<h2>Recipe</h2><pre>{html.escape(recipe)}</pre>
</body></html>
"""


def _recipe_tree(text: str) -> dict[str, Any]:
    import yaml

    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return tree if isinstance(tree, dict) else {}


def render(folder: Path, output: Path | None = None, eval_html: str = "") -> Path:
    """Write the fine-tune run's page (default RUN/report.html); returns its path."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: metrics not found{did_you_mean(path)}")
    recipe_file = folder / "recipe.yaml"
    recipe = recipe_file.read_text(encoding="utf-8") if recipe_file.is_file() else ""
    output = output or folder / "report.html"
    write_text(output, page(folder, read_metrics(path), recipe, eval_html))
    return output
