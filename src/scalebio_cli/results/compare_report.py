"""What `scalebio compare` leaves in its folder besides compare.json: the table (compare.md), the plot
(compare.png: per-seed points and mean +- std per mix), and the HTML page `scalebio report DIR` renders."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from scalebio_cli.errors import InputError
from scalebio_cli.files import atomic_path, write_text

FORMAT = "scalebio-compare/1"


def read(folder: Path) -> dict[str, Any]:
    path = folder / "compare.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the comparison ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("mixes"), dict):
        raise InputError(f"{path}: not a comparison of format {FORMAT!r}")
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
    return "-" if not entry else f"{entry['mean']:.4f} ± {entry['std']:.4f}"


def markdown(doc: dict[str, Any]) -> str:
    columns = _columns(doc)
    head = "| mix | " + " | ".join(f"{t} {m}" for t, m in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = [f"| {name} | " + " | ".join(_cell(mix["results"].get(t, {}).get(m)) for t, m in columns) + " |"
            for name, mix in doc["mixes"].items()]
    seeds = ", ".join(str(s) for s in doc.get("seeds", []))
    return "\n".join([f"{doc.get('num_samples', '?')} samples per mix, seeds {seeds}: mean ± std over seeds", "",
                      head, rule, *rows]) + "\n"


def figure(doc: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _columns(doc) or [("-", "loss")]
    names = list(doc["mixes"])
    fig, axes = plt.subplots(1, len(columns), figsize=(max(4.0, 1.1 * len(names) + 1.5) * len(columns), 3.6),
                             squeeze=False)
    for ax, (test, metric) in zip(axes[0], columns):
        for x, name in enumerate(names):
            entry = doc["mixes"][name]["results"].get(test, {}).get(metric)
            if not entry:
                continue
            seeds = entry["per_seed"]
            offsets = [(i - (len(seeds) - 1) / 2) * 0.08 for i in range(len(seeds))]
            ax.scatter([x + o for o in offsets], seeds, s=14, color="#999", zorder=2)
            ax.errorbar([x], [entry["mean"]], yerr=[entry["std"]], fmt="o", color="#1f77b4", capsize=5, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title(f"{test}: {metric}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
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
    head = "".join(f"<th>{html.escape(f'{t} {m}')}</th>" for t, m in columns)
    rows = []
    for name, mix in doc["mixes"].items():
        cells = "".join(f"<td class=n>{html.escape(_cell(mix['results'].get(t, {}).get(m)))}</td>" for t, m in columns)
        rows.append(f"<tr><td>{html.escape(name)}<div class=p>{html.escape(str(mix.get('spec', '')))}</div></td>"
                    f"{cells}</tr>")
    image = base64.b64encode(_png(doc)).decode()
    seeds = ", ".join(str(s) for s in doc.get("seeds", []))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>scalebio compare: {html.escape(folder.name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ddd;padding:4px 8px}}th{{background:#f4f4f4}}.n{{text-align:right}}
.p{{color:#777;font-size:11px}}.meta{{color:#555;font-size:13px}}img{{max-width:100%}}</style></head><body>
<h1>Mixture comparison</h1><div class=meta>{html.escape(str(folder))} · model {html.escape(str(doc.get('model')))} ·
{html.escape(str(doc.get('num_samples')))} samples per mix · seeds {html.escape(seeds)} · mean ± std over seeds</div>
<table><tr><th>mix</th>{head}</tr>{''.join(rows)}</table>
<figure><img alt="comparison" src="data:image/png;base64,{image}"></figure>
</body></html>
"""


def render(folder: Path, output: Path | None = None) -> Path:
    """Write the comparison's HTML page (default DIR/report.html); returns its path."""
    output = output or folder / "report.html"
    write_text(output, page(read(folder), folder))
    return output
