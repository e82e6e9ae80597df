"""`scalebio compare`: every mix x seed sampled, fine-tuned and evaluated; compare.json with per-seed values, mean and
std; a rerun reuses every finished cell; `scalebio report DIR` renders the folder; changed settings and bad mixes
exit 2. One comparison (2 mixes x 2 seeds, then its rerun) serves every assertion about it (a module fixture)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
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


@pytest.fixture(scope="module")
def files(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with recipe.yaml (the demo's, 1 epoch of 8-record steps), weights.json and test.jsonl (24 records)."""
    root = tmp_path_factory.mktemp("compare")
    write_recipe(root / "recipe.yaml", demo, finetune={"lr": 3e-3, "batch_size": 8, "epochs": 1, "micro_batch_size": 8})
    _weights(demo, root / "weights.json")
    lines = (demo / "data" / "test.jsonl").read_text().splitlines(keepends=True)
    (root / "test.jsonl").write_text("".join(lines[:24]))
    return root


def _args(files: Path, out: Path, *mixes: str) -> list[str]:
    return ["compare", "--config", str(files / "recipe.yaml"), *[a for m in mixes for a in ("--mix", m)],
            "--test", f"test={files / 'test.jsonl'}", "-o", str(out)]


@dataclass
class Run:
    out: Path
    args: list[str]
    result: subprocess.CompletedProcess[str]
    doc: dict
    mtimes: dict[str, int]  # each cell's eval.json after the first run
    again: subprocess.CompletedProcess[str]
    report: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def run(files: Path) -> Run:
    """compare (scalebio weights vs uniform, seeds 0 and 1, 16 records a cell), its rerun, and `scalebio report`
    on the folder."""
    out = files / "cmp"
    args = [*_args(files, out, f"scalebio={files / 'weights.json'}", "uniform"), "-n", "16", "--seeds", "0", "1"]
    result = invoke(*args)
    assert result.returncode == 0, result.stderr
    doc = json.loads((out / "compare.json").read_text())
    mtimes = {c.name: (c / "eval.json").stat().st_mtime_ns for c in (out / "cells").iterdir()}
    again = invoke(*args)
    assert again.returncode == 0, again.stderr
    return Run(out, args, result, doc, mtimes, again, invoke("report", out))


def test_compare_writes_every_cell_and_the_summary(run: Run) -> None:
    out, doc = run.out, run.doc
    assert run.result.stdout.strip() == str(out / "compare.json")
    assert doc["format"] == "scalebio-compare/1" and doc["seeds"] == [0, 1] and doc["num_samples"] == 16
    assert set(doc["mixes"]) == {"scalebio", "uniform"} and doc["mixes"]["uniform"]["spec"] == "uniform"
    for mix in doc["mixes"].values():
        loss = mix["results"]["test"]["loss"]
        assert len(loss["per_seed"]) == 2 and loss["std"] >= 0
        assert loss["mean"] == pytest.approx(sum(loss["per_seed"]) / 2)
    assert "cell 4 of 4: uniform seed 1" in run.result.stderr
    assert (out / "compare.png").stat().st_size > 0 and "| scalebio |" in (out / "compare.md").read_text()
    assert sorted(run.mtimes) == ["scalebio-seed0", "scalebio-seed1", "uniform-seed0", "uniform-seed1"]
    sample = [json.loads(line) for line in (out / "cells" / "scalebio-seed0" / "sample.jsonl").read_text().splitlines()]
    assert len(sample) == 16 and sum(r["source"] == "clean" for r in sample) == 13  # round(16 x 0.8)
    seeds = [(out / "cells" / f"uniform-seed{s}" / "sample.jsonl").read_text() for s in (0, 1)]
    assert seeds[0] != seeds[1]  # each seed its own draw


def test_rerun_reuses_every_finished_cell(run: Run) -> None:
    assert run.again.stderr.count("reusing the finished cell") == 4
    assert "finetune" not in run.again.stderr.replace("finetune.", "")
    cells = run.out / "cells"
    assert {c: (cells / c / "eval.json").stat().st_mtime_ns for c in run.mtimes} == run.mtimes
    assert json.loads((run.out / "compare.json").read_text())["mixes"] == run.doc["mixes"]


def test_report_renders_the_folder(run: Run) -> None:
    assert run.report.returncode == 0, run.report.stderr
    page = (run.out / "report.html").read_text()
    assert "Mixture comparison" in page and "scalebio" in page and "data:image/png;base64," in page


def test_changed_settings_refuse_a_finished_cell(files: Path, run: Run, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    shutil.copytree(run.out, out)
    summary = (out / "compare.json").stat().st_mtime_ns
    changed = invoke(*_args(files, out, f"scalebio={files / 'weights.json'}", "uniform"), "-n", "17",
                     "--seeds", "0", "1")
    assert changed.returncode == 2 and "finished with other settings" in changed.stderr, changed.stderr
    assert "Traceback" not in changed.stderr and (out / "compare.json").stat().st_mtime_ns == summary
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(run.mtimes)  # nothing new started
    forced = invoke(*_args(files, out, "uniform"), "-n", "9", "--seeds", "0", "--force")  # one cell redone
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "compare.json").read_text())["num_samples"] == 9
    assert len((out / "cells" / "uniform-seed0" / "sample.jsonl").read_text().splitlines()) == 9


@pytest.mark.parametrize(("mix", "message"), [
    ("a=missing.json", "--mix a: file not found"),
    ("noname", "--mix 'noname': expected NAME=SPEC"),
])
def test_bad_mix_exits_2(files: Path, tmp_path: Path, mix: str, message: str) -> None:
    result = invoke(*_args(files, tmp_path / "cmp", mix), "-n", "4")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "cmp").exists()


def test_a_signal_during_a_cells_last_step_stops_before_the_next_cell(files: Path, tmp_path: Path) -> None:
    """SIGTERM while a cell's fine-tuning takes its last step: that fine-tuning finishes (finishing beats a
    checkpoint) and compare stops before the next cell instead of going on (the stage's handler passes the signal
    out); the finished cell is kept for the rerun."""
    import os
    import signal
    from types import SimpleNamespace

    from scalebio_cli.errors import TrainingStopped
    from scalebio_cli.recipe import load_recipe
    from scalebio_cli.stages import compare
    from scalebio_cli.train.stopping import StopSignals

    calls = []
    before = signal.getsignal(signal.SIGTERM)

    def finetune(recipe, resume, force):  # a fine-tuning whose last step receives SIGTERM
        with StopSignals().installed():
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(recipe.output_dir)

    def evaluate(model, tests, output, **_):
        output.write_text(json.dumps({"results": {"test": {"loss": 1.0}}}))
        return json.loads(output.read_text())

    recipe = load_recipe(files / "recipe.yaml", [])
    mix = compare.Mix("file", str(files / "test.jsonl"), "file")
    c = compare.Comparison(recipe, {"file": mix}, {"test": str(files / "test.jsonl")}, 8, [0, 1], tmp_path / "out")
    stages = compare.Stages(SimpleNamespace(), SimpleNamespace(run=finetune), SimpleNamespace(run=evaluate))
    with pytest.raises(TrainingStopped, match="after 1 of 2 cells") as stopped:
        compare.run(c, stages)
    assert stopped.value.signal == "SIGTERM" and len(calls) == 1
    assert (tmp_path / "out" / "cells" / "file-seed0" / "eval.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is before  # compare's handler is gone again
