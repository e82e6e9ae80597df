"""What `scalebio compare` leaves in its folder besides compare.json: the table (compare.md), the plot
(compare.png), and the HTML page `scalebio report DIR` renders. Reads `scalebio-compare/2` (paired: a base row,
records, tokens, cost, each mix minus the baseline with a 95% interval; plot: the values with the base model's as a
line, and the paired differences with their intervals) and the older `scalebio-compare/1` (mean +- std only)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from scalebio_cli.errors import InputError
from scalebio_cli.files import atomic_path, write_text

FORMATS = ("scalebio-compare/1", "scalebio-compare/2")


def read(folder: Path) -> dict[str, Any]:
    path = folder / "compare.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the comparison ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") not in FORMATS or not isinstance(doc.get("mixes"), dict):
        raise InputError(f"{path}: not a comparison of format {' or '.join(map(repr, FORMATS))}")
    return doc


def _columns(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(test, metric) pairs present for some mix, in test order then metric order."""
    seen: list[tuple[str, str]] = []
    for mix in doc["mixes"].values():
        for test, metrics in mix["results"].items():
            for metric in metrics:
                if metric != "perplexity" and (test, metric) not in seen:
                    seen.append((test, metric))
    return seen


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    spread = "" if entry.get("std") is None else f" ± {entry['std']:.4f}"
    return f"{entry['mean']:.4f}{spread}"


def _diff(entry: dict[str, Any] | None) -> str:
    """A paired difference: `+0.0123 [+0.0050, +0.0196]`, or the mean with `(1 seed: no interval)`."""
    vs = (entry or {}).get("vs_baseline")
    if not vs:
        return "-"
    interval = vs.get("ci95")
    shown = f"[{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else "(one seed: no interval)"
    return f"{vs['diff_mean']:+.4f} {shown}"


def _cost(cost: dict[str, Any] | None) -> str:
    if not cost or cost.get("seconds") is None:
        return "unknown" if cost else "-"
    if not cost["seconds"]:
        return "0"
    units = "" if cost.get("fine_tunes") is None else f" ({cost['fine_tunes']:.2g} fine-tunes)"
    return f"{cost['seconds'] / 60:.1f} min{units}"


def _count(entry: Any) -> str:
    return "-" if not isinstance(entry, dict) else f"{entry['mean']:,.0f}"


def _rows(doc: dict[str, Any], columns: list[tuple[str, str]]) -> list[list[str]]:
    """The table's rows as cell texts: the base model (v2), then every mix."""
    paired = doc.get("format") == "scalebio-compare/2"
    rows = []
    base = (doc.get("base") or {}).get("results")
    if paired and base:
        rows.append(["base (before fine-tuning)", "-", "-", "-"]
                    + [x for t, m in columns for x in (_cell({"mean": base[t][m]} if base.get(t, {}).get(m)
                                                             is not None else None), "-")])
    for name, mix in doc["mixes"].items():
        values = [mix["results"].get(t, {}).get(m) for t, m in columns]
        if paired:
            label = f"{name} (baseline)" if name == doc.get("baseline") else name
            rows.append([label, _count(mix.get("records")), _count(mix.get("tokens")), _cost(mix.get("cost"))]
                        + [x for v in values for x in (_cell(v), _diff(v))])
        else:
            rows.append([name] + [_cell(v) for v in values])
    return rows


def _head(doc: dict[str, Any], columns: list[tuple[str, str]]) -> list[str]:
    if doc.get("format") != "scalebio-compare/2":
        return ["mix"] + [f"{t} {m}" for t, m in columns]
    return (["mix", "records", "response tokens", "cost"]
            + [x for t, m in columns for x in (f"{t} {m}", f"vs {doc.get('baseline')} (95% CI)")])


def _notes(doc: dict[str, Any]) -> list[str]:
    from scalebio_cli.results.paired import ceiling_sentence

    seeds = ", ".join(str(s) for s in doc.get("seeds", []))
    if doc.get("format") != "scalebio-compare/2":
        return [f"{doc.get('num_samples', '?')} samples per mix, seeds {seeds}: mean ± std over seeds"]
    terms = ("the same response tokens per seed" if doc.get("match") == "tokens"
             else f"{doc.get('num_samples', '?')} records per mix")
    out = [f"{terms}, seeds {seeds} (seed k: the same fine-tuning randomness for every mix): mean ± std over seeds; "
           f"`vs {doc.get('baseline')}`: mix minus baseline seed by seed, mean and 95% t-interval"]
    if doc.get("ceiling"):
        out.append(ceiling_sentence(doc["ceiling"]))
    out += [f"Warning: {w}" for w in doc.get("warnings") or []]
    return out


def markdown(doc: dict[str, Any]) -> str:
    columns = _columns(doc)
    head = _head(doc, columns)
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(doc, columns)]
    notes = _notes(doc)
    return "\n".join([notes[0], "", *lines, *(["", *notes[1:]] if notes[1:] else [])]) + "\n"


def _values_panel(ax: Any, doc: dict[str, Any], names: list[str], test: str, metric: str) -> None:
    """Per-seed points and mean (+- std) per mix; the base model's value as a dashed line (v2)."""
    for x, name in enumerate(names):
        entry = doc["mixes"][name]["results"].get(test, {}).get(metric)
        if not entry:
            continue
        seeds = entry["per_seed"]
        offsets = [(i - (len(seeds) - 1) / 2) * 0.08 for i in range(len(seeds))]
        ax.scatter([x + o for o in offsets], seeds, s=14, color="#999", zorder=2)
        ax.errorbar([x], [entry["mean"]], yerr=[entry.get("std") or 0.0], fmt="o", color="#1f77b4", capsize=5,
                    zorder=3)
    base = ((doc.get("base") or {}).get("results") or {}).get(test, {}).get(metric)
    if base is not None:
        ax.axhline(base, color="#d62728", linestyle="--", linewidth=1, label="base model (before fine-tuning)")
        ax.legend(fontsize=8, loc="best")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_title(f"{test}: {metric}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _diff_panel(ax: Any, doc: dict[str, Any], names: list[str], test: str, metric: str) -> None:
    """Each mix minus the baseline: per-seed differences, their mean and 95% interval, and 0."""
    for x, name in enumerate(names):
        vs = (doc["mixes"][name]["results"].get(test, {}).get(metric) or {}).get("vs_baseline")
        if not vs:
            continue
        diffs = vs["per_seed"]
        offsets = [(i - (len(diffs) - 1) / 2) * 0.08 for i in range(len(diffs))]
        ax.scatter([x + o for o in offsets], diffs, s=14, color="#999", zorder=2)
        interval = vs.get("ci95")
        err = [[vs["diff_mean"] - interval[0]], [interval[1] - vs["diff_mean"]]] if interval else None
        ax.errorbar([x], [vs["diff_mean"]], yerr=err, fmt="o", color="#2ca02c", capsize=5, zorder=3)
    ax.axhline(0.0, color="#555", linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_title(f"{test}: {metric}, minus {doc.get('baseline')} (95% CI)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def figure(doc: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _columns(doc) or [("-", "loss")]
    names = list(doc["mixes"])
    paired = doc.get("format") == "scalebio-compare/2"
    others = [n for n in names if n != doc.get("baseline")]
    width = max(4.0, 1.1 * len(names) + 1.5)
    fig, axes = plt.subplots(2 if paired and others else 1, len(columns), figsize=(width * len(columns), 3.6 * (
        2 if paired and others else 1)), squeeze=False)
    for k, (test, metric) in enumerate(columns):
        _values_panel(axes[0][k], doc, names, test, metric)
        if paired and others:
            _diff_panel(axes[1][k], doc, others, test, metric)
    fig.tight_layout()
    return fig


def _png(doc: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    fig = figure(doc)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_table_and_plot(doc: dict[str, Any], folder: Path) -> None:
    write_text(folder / "compare.md", markdown(doc))
    with atomic_path(folder / "compare.png") as tmp:
        tmp.write_bytes(_png(doc))


def page(doc: dict[str, Any], folder: Path) -> str:
    columns = _columns(doc)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _head(doc, columns))
    specs = {name: str(mix.get("spec", "")) for name, mix in doc["mixes"].items()}
    table = _rows(doc, columns)
    names = [""] * (len(table) - len(specs)) + list(specs)  # the base row (v2) comes first and has no spec
    rows = []
    for row, name in zip(table, names):
        spec = f"<div class=p>{html.escape(specs[name])}</div>" if name else ""
        cells = "".join(f"<td class=n>{html.escape(v)}</td>" for v in row[1:])
        rows.append(f"<tr><td>{html.escape(row[0])}{spec}</td>{cells}</tr>")
    notes = "".join(f"<p class=meta>{html.escape(n)}</p>" for n in _notes(doc))
    image = base64.b64encode(_png(doc)).decode()
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>scalebio compare: {html.escape(folder.name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ddd;padding:4px 8px}}th{{background:#f4f4f4}}.n{{text-align:right}}
.p{{color:#777;font-size:11px}}.meta{{color:#555;font-size:13px}}img{{max-width:100%}}</style></head><body>
<h1>Mixture comparison</h1><div class=meta>{html.escape(str(folder))} · model {html.escape(str(doc.get('model')))}</div>
{notes}
<table><tr>{head}</tr>{''.join(rows)}</table>
<figure><img alt="comparison" src="data:image/png;base64,{image}"></figure>
</body></html>
"""


def render(folder: Path, output: Path | None = None) -> Path:
    """Write the comparison's HTML page (default DIR/report.html); returns its path."""
    output = output or folder / "report.html"
    write_text(output, page(read(folder), folder))
    return output
