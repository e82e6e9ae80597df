"""`scalebio report`: one self-contained HTML page of a run, with results side by side when given."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli


def eval_result(path: Path, loss: float, accuracy: float | None) -> Path:
    entry = {"loss": loss, "perplexity": 2.718 ** loss, "num_examples": 200, "num_tokens": 4000}
    if accuracy is not None:
        entry.update(accuracy=accuracy, num_checked=200)
    path.write_text(json.dumps({"model": f"/m/{path.stem}", "results": {"test": entry}}))
    return path


def test_report_page_is_self_contained(reweighted: Path, tmp_path: Path) -> None:
    a = eval_result(tmp_path / "scalebio.json", 2.77, 0.41)
    b = eval_result(tmp_path / "uniform.json", 3.12, None)
    out = tmp_path / "page" / "report.html"
    result = run_cli("report", str(reweighted), "-o", str(out), "--eval", f"scalebio={a}", "--eval", f"uniform={b}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    page = out.read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert images[:5] == ["Source weights over steps", "Objectives", "Per-source losses", "Lambda gradients",
                          "Learning rates"] and "evaluation" in images
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from the network
    doc = json.loads((reweighted / "weights.json").read_text())
    for name, weight in doc["weights"].items():
        assert f"<td>{name}</td><td class=n>{weight:.4f}</td>" in page
    assert "<td class=n>-</td>" in page  # num_truncated not recorded by this weights file
    assert "2.7700" in page and "0.410" in page and "reweight:" in page  # eval table and the recipe


def test_report_of_a_folder_without_weights_exits_2(tmp_path: Path) -> None:
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2 and "weights.json" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Chromium (apt-get install chromium)")
def test_report_renders_in_a_headless_browser(reweighted: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    assert run_cli("report", str(reweighted), "-o", str(page)).returncode == 0
    png = tmp_path / "report.png"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(page), str(png),
                    "--height", "900"], check=True, timeout=120)
    assert png.stat().st_size > 50_000  # charts drawn, not a blank page


def test_smoothing_follows_the_trend_and_skips_gaps() -> None:
    from scalebio_cli.results.reweight_report import smooth

    noisy = [1.0 + (0.5 if i % 2 else -0.5) for i in range(40)]
    smoothed = smooth(noisy)
    assert len(smoothed) == 40 and max(abs(v - 1.0) for v in smoothed[10:]) < 0.2  # the zig-zag averaged out
    assert smooth([None, 2.0, float("nan"), 4.0], span=1)[1:] == [2.0, 2.0, 4.0]  # gaps carried, not averaged in


def test_report_flags_uneven_truncation_and_shows_evidence_only_when_present(reweighted: Path,
                                                                             tmp_path: Path) -> None:
    from scalebio_cli.stages import report

    run = tmp_path / "run"
    shutil.copytree(reweighted, run, ignore=shutil.ignore_patterns("tensorboard", "checkpoints"))
    doc = json.loads((run / "weights.json").read_text())
    assert "evidence" in doc  # every run writes it; a weights file of an earlier version has none
    (run / "weights.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "evidence"}))
    plain = report.run(run, tmp_path / "plain.html").read_text()
    assert "Evidence" not in plain and "Truncation differs" not in plain  # the demo fits max_length; no evidence
    assert "exponential moving average" in plain
    names = list(doc["weights"])
    for name, cut in zip(names, [0, 150, 3]):  # 0%, 25%, 0.5% of 600 records
        doc["sources"][name].update(num_examples=600, num_truncated=cut)
    doc["evidence"] = {names[0]: {"advantage": 0.031, "stderr": 0.008, "z": 3.9, "steps": 18},
                       names[1]: {"advantage": -0.004, "stderr": 0.006, "z": -0.7, "steps": 18}}
    (run / "weights.json").write_text(json.dumps(doc))
    page = report.run(run, tmp_path / "flagged.html").read_text()
    assert "Truncation differs between sources" in page and f"{names[1]} 25%" in page
    assert '<td class="n warn">150 (25%)</td>' in page  # the source that loses most is marked in the table
    assert "<h2>Evidence</h2>" in page and "|z| &lt; 2: the run cannot tell this source from the mixture" in page
    assert f"<tr class=weak><td>{names[1]}</td>" in page and "cannot tell from the mixture" in page
    assert f"<tr><td>{names[0]}</td><td class=n>0.0310</td>" in page
