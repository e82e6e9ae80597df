"""The `report` page's section on groups: a run whose sources are groups (`split_by: group` over a file written by
`scalebio group`) shows each group's weight and verdict beside its example records (from the file's manifest), and
the weights rolled up per original source."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

EXAMPLE_CHARS = 160  # characters of an example record shown in a table cell


def manifest_path(output: str | Path) -> Path:
    """OUT.manifest.json beside a grouped file OUT."""
    p = Path(output)
    return p.with_name(p.stem + ".manifest.json")


def _group_value(info: Any) -> tuple[str, str] | None:
    """(the grouped file, the group) of a weights.json source read as `split_by: group`, or None."""
    source = info.get("source") if isinstance(info, dict) else None
    if not isinstance(source, dict) or not isinstance(source.get("spec"), dict):
        return None
    spec = source["spec"]
    if spec.get("split_by") != "group" or source.get("value") is None or not spec.get("path"):
        return None
    return str(spec["path"]), str(source["value"])


def _manifest(path: str, cache: dict[str, Any]) -> dict[str, Any]:
    if path not in cache:
        try:
            cache[path] = json.loads(manifest_path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache[path] = {}  # a grouped file without its manifest: weights only
    return cache[path] if isinstance(cache[path], dict) else {}


def _example_text(example: Any) -> str:
    text = json.dumps(example.get("data") if isinstance(example, dict) else example, ensure_ascii=False)
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "…"


def _rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per group source of the run: name, weights, verdict, the group's manifest entry, its source."""
    cache: dict[str, Any] = {}
    rows = []
    averaged = doc.get("weights_averaged") or {}
    evidence = doc.get("evidence") or {}
    for name, weight in (doc.get("weights") or {}).items():
        found = _group_value((doc.get("sources") or {}).get(name))
        if found is None:
            continue
        path, value = found
        entry = (_manifest(path, cache).get("groups") or {}).get(value) or {}
        origin = entry.get("source") or value.rsplit("/", 1)[0]
        rows.append({"name": name, "weight": weight, "averaged": averaged.get(name),
                     "verdict": (evidence.get(name) or {}).get("verdict"), "entry": entry,
                     "rollup": f"{name[: -len(value) - 1]}/{origin}" if name.endswith("/" + value) else origin})
    return rows


def groups_section(doc: dict[str, Any]) -> str:
    """The HTML section ("" for a run without groups)."""
    rows = _rows(doc)
    if not rows:
        return ""

    def number(value: Any) -> str:
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))

    body = []
    for r in rows:
        examples = "<br>".join(html.escape(_example_text(e)) for e in (r["entry"].get("examples") or [])[:2])
        body.append(f"<tr><td>{html.escape(r['name'])}</td><td class=n>{number(r['weight'])}</td>"
                    f"<td class=n>{number(r['averaged'])}</td><td>{html.escape(str(r['verdict'] or '-'))}</td>"
                    f"<td class=n>{number(r['entry'].get('size'))}</td><td class=n>"
                    f"{number(r['entry'].get('mean_loss'))}</td><td class=p>{examples or '-'}</td></tr>")
    rollup: dict[str, list[float]] = {}
    for r in rows:
        totals = rollup.setdefault(r["rollup"], [0.0, 0.0])
        totals[0] += float(r["weight"])
        totals[1] += float(r["averaged"] or 0.0)
    summed = "".join(f"<tr><td>{html.escape(n)}</td><td class=n>{w:.4f}</td><td class=n>{a:.4f}</td></tr>"
                     for n, (w, a) in rollup.items())
    return ("<h2>Groups</h2><p class=meta>Sources read as <code>split_by: group</code> from a file of "
            "<code>scalebio group</code>: each group's weight and verdict, its size and mean response loss under "
            "the model that grouped it, and the records nearest its cluster's centre (from the file's manifest).</p>"
            "<table><tr><th>group</th><th>weight</th><th>averaged</th><th>verdict</th><th>records</th>"
            "<th>mean loss</th><th>example records</th></tr>" + "".join(body) + "</table>"
            "<h3>Per source</h3><table><tr><th>source</th><th>weight</th><th>averaged</th></tr>" + summed +
            "</table>")
