"""`scalebio report`: one self-contained HTML page of a reweight run (no network: charts are inlined PNGs); a
finetune run's page is results/finetune_report.py's, a compare folder's results/compare_report.py's.

Reads what the run left behind: metrics.jsonl (weights, L1 and the per-source losses of u and w, lambda gradients,
learning rates over the steps), weights.json (final and averaged weights, source sizes and truncation, the
resolved recipe) and recipe.yaml; with `--eval NAME=RESULT.json` (files written by `scalebio eval`) a side-by-side
table and bar chart of held-out loss and accuracy. The page itself (charts, tables) is results/reweight_report.py's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from scalebio_cli.errors import InputError
from scalebio_cli.files import did_you_mean, write_text

WEIGHTS_FORMAT = "scalebio-weights/1"


# -- reading the run ---------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: {what} not found{did_you_mean(path)}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: {what} is not valid JSON ({exc})") from None


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """(weights.json, metrics lines, recipe YAML text) of a reweight run folder."""
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: run folder not found{did_you_mean(run_dir)}")
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


def run(run_dir: Path, output: Path | None = None, evals: dict[str, str] | None = None) -> Path:
    """Write RUN/report.html (or `output`); returns its path. A `scalebio compare` folder gets its own page."""
    if (run_dir / "compare.json").is_file():
        from scalebio_cli.results import compare_report

        return compare_report.render(run_dir, output)
    from scalebio_cli.results import finetune_report, reweight_report

    if finetune_report.is_finetune_run(run_dir):  # loss per source and per validation set (finetune_report.py)
        results = read_evals(evals or {})
        return finetune_report.render(run_dir, output, reweight_report.eval_table(results) if results else "")
    doc, metrics, recipe = read_run(run_dir)
    results = read_evals(evals or {})
    output = output or run_dir / "report.html"
    text = reweight_report.page(doc, reweight_report.charts(doc, metrics), recipe, results,
                                reweight_report.eval_chart(results) if results else None, run_dir)
    write_text(output, text)
    from rich.markup import escape

    from scalebio_cli.console import console

    console.print(f"[bold green]report[/] {len(text) / 1024:,.0f} KiB, self-contained: {escape(str(output))}")
    return output
