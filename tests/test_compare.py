"""`scalebio compare`: every mix x seed sampled, fine-tuned and evaluated; compare.json with per-seed values, mean and
std; a rerun reuses every finished cell; `scalebio report DIR` renders the folder; bad mixes exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import invoke, write_recipe


def _weights(demo: Path, path: Path) -> Path:
    """A weights file over the demo sources as reweight writes it (clean favoured)."""
    from scalebio_cli.data.read.records import count_records
    from scalebio_cli.files import file_sha256
    from scalebio_cli.results import weights_file

    files = {"clean": demo / "data" / "clean.jsonl", "noisy": demo / "data" / "noisy.json",
             "offtopic": demo / "data" / "offtopic.parquet"}
    probs = {"clean": 0.8, "noisy": 0.05, "offtopic": 0.15}
    doc = weights_file.build(weights=probs, weights_averaged=probs, validation=None, trajectory=[], steps=1, seed=0,
                             model=str(demo / "model"), config={},
                             sources={n: {"path": str(p), "num_examples": count_records(p), "sha256": file_sha256(p)}
                                      for n, p in files.items()})
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture()
def recipe(demo: Path, tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", demo,
                        finetune={"lr": 3e-3, "batch_size": 8, "epochs": 1, "micro_batch_size": 8})


def test_compare_two_mixes_two_seeds_then_reuse(demo: Path, tmp_path: Path, recipe: Path) -> None:
    weights = _weights(demo, tmp_path / "weights.json")
    out = tmp_path / "cmp"
    args = ["compare", "--config", recipe, "--mix", f"scalebio={weights}", "--mix", "uniform",
            "--test", f"test={demo / 'data' / 'test.jsonl'}", "-n", "16", "--seeds", "0", "1", "-o", out]
    result = invoke(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out / "compare.json")
    doc = json.loads((out / "compare.json").read_text())
    assert doc["format"] == "scalebio-compare/1" and doc["seeds"] == [0, 1] and doc["num_samples"] == 16
    assert set(doc["mixes"]) == {"scalebio", "uniform"} and doc["mixes"]["uniform"]["spec"] == "uniform"
    for mix in doc["mixes"].values():
        loss = mix["results"]["test"]["loss"]
        assert len(loss["per_seed"]) == 2 and loss["std"] >= 0
        assert loss["mean"] == pytest.approx(sum(loss["per_seed"]) / 2)
    assert "cell 4 of 4: uniform seed 1" in result.stderr
    assert (out / "compare.png").stat().st_size > 0 and "| scalebio |" in (out / "compare.md").read_text()
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert cells == ["scalebio-seed0", "scalebio-seed1", "uniform-seed0", "uniform-seed1"]
    sample = [json.loads(line) for line in (out / "cells" / "scalebio-seed0" / "sample.jsonl").read_text().splitlines()]
    assert len(sample) == 16 and sum(r["source"] == "clean" for r in sample) == 13  # round(16 x 0.8)
    mtimes = {c: (out / "cells" / c / "eval.json").stat().st_mtime_ns for c in cells}

    again = invoke(*args)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("reusing the finished cell") == 4 and "finetune" not in again.stderr.replace(
        "finetune.", "")
    assert {c: (out / "cells" / c / "eval.json").stat().st_mtime_ns for c in cells} == mtimes
    assert json.loads((out / "compare.json").read_text())["mixes"] == doc["mixes"]

    report = invoke("report", out)
    assert report.returncode == 0, report.stderr
    page = (out / "report.html").read_text()
    assert "Mixture comparison" in page and "scalebio" in page and "data:image/png;base64," in page


def test_changed_settings_refuse_a_finished_cell(demo: Path, tmp_path: Path, recipe: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--config", recipe, "--mix", "uniform", "--test", f"test={demo / 'data' / 'val.jsonl'}",
            "--seeds", "0", "-o", out]
    assert invoke(*args, "-n", "8").returncode == 0
    changed = invoke(*args, "-n", "9")
    assert changed.returncode == 2 and "finished with other settings" in changed.stderr
    forced = invoke(*args, "-n", "9", "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "compare.json").read_text())["num_samples"] == 9


@pytest.mark.parametrize(("mix", "message"), [
    ("a=missing.json", "--mix a: file not found"),
    ("noname", "--mix 'noname': expected NAME=SPEC"),
])
def test_bad_mix_exits_2(demo: Path, tmp_path: Path, recipe: Path, mix: str, message: str) -> None:
    result = invoke("compare", "--config", recipe, "--mix", mix, "--test", f"t={demo / 'data' / 'test.jsonl'}",
                    "-n", "4", "-o", tmp_path / "cmp")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "cmp").exists()
