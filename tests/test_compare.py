"""`scalebio compare`: a paired experiment (compare.json `scalebio-compare/2`): every mix trains on N records (a file
mix larger than N subsampled per seed, a `source:` mix from one source), reports records, response tokens, cost and
its paired difference to the baseline; the base model has its row; reuse is by content (a weights or test file
rewritten at the same path is never reused); infeasible cells are refused before any starts; `scalebio report DIR`
renders /2 and /1. One comparison (4 mixes x 2 seeds, then its rerun) serves every assertion about it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import invoke, write_recipe


def _weights(demo: Path, path: Path, probs: dict[str, float] | None = None) -> Path:
    """A weights file over the demo sources as reweight writes it (clean favoured)."""
    from scalebio_cli.data.read.records import count_records
    from scalebio_cli.files import file_sha256
    from scalebio_cli.results import weights_file

    files = {"clean": demo / "data" / "clean.jsonl", "noisy": demo / "data" / "noisy.json",
             "offtopic": demo / "data" / "offtopic.parquet"}
    probs = probs or {"clean": 0.8, "noisy": 0.05, "offtopic": 0.15}
    doc = weights_file.build(weights=probs, weights_averaged=probs, validation=None, trajectory=[], steps=1, seed=0,
                             model=str(demo / "model"), config={},
                             sources={n: {"path": str(p), "num_examples": count_records(p), "sha256": file_sha256(p)}
                                      for n, p in files.items()})
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def files(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """recipe.yaml (the demo's, 1 epoch of 8-record steps), weights.json, test.jsonl (24 records) and big.jsonl (a
    record file of 40 records, more than the N a cell trains on)."""
    root = tmp_path_factory.mktemp("compare")
    write_recipe(root / "recipe.yaml", demo, finetune={"lr": 3e-3, "batch_size": 8, "epochs": 1, "micro_batch_size": 8})
    _weights(demo, root / "weights.json")
    lines = (demo / "data" / "test.jsonl").read_text().splitlines(keepends=True)
    (root / "test.jsonl").write_text("".join(lines[:24]))
    clean = (demo / "data" / "clean.jsonl").read_text().splitlines(keepends=True)
    (root / "big.jsonl").write_text("".join(clean[:40]))
    return root


def _args(files: Path, out: Path, *mixes: str, test: Path | None = None) -> list[str]:
    return ["compare", "--config", str(files / "recipe.yaml"), *[a for m in mixes for a in ("--mix", m)],
            "--test", f"test={test or files / 'test.jsonl'}", "-o", str(out)]


@dataclass
class Run:
    out: Path
    result: subprocess.CompletedProcess[str]
    doc: dict
    mtimes: dict[str, int]  # each cell's eval.json after the first run
    again: subprocess.CompletedProcess[str]
    report: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def run(files: Path) -> Run:
    """compare (scalebio weights, uniform, the 40-record file, clean alone; seeds 0 and 1; 12 records a cell), its
    rerun, and `scalebio report` on the folder."""
    out = files / "cmp"
    args = [*_args(files, out, f"scalebio={files / 'weights.json'}", "uniform", f"big={files / 'big.jsonl'}",
                   "solo=source:clean"), "-n", "12", "--seeds", "0", "1"]
    result = invoke(*args)
    assert result.returncode == 0, result.stderr
    doc = json.loads((out / "compare.json").read_text())
    mtimes = {c.name: (c / "eval.json").stat().st_mtime_ns for c in (out / "cells").iterdir()}
    again = invoke(*args)
    assert again.returncode == 0, again.stderr
    return Run(out, result, doc, mtimes, again, invoke("report", out))


def test_compare_v2_terms_cost_and_paired_differences(run: Run, files: Path) -> None:
    out, doc = run.out, run.doc
    assert run.result.stdout.strip() == str(out / "compare.json")
    assert doc["format"] == "scalebio-compare/2" and doc["seeds"] == [0, 1] and doc["num_samples"] == 12
    assert doc["baseline"] == "uniform" and doc["match"] == "records"
    assert set(doc["mixes"]) == {"scalebio", "uniform", "big", "solo"}
    for name, mix in doc["mixes"].items():
        assert mix["records"]["per_seed"] == [12, 12], name  # every mix trains on exactly N records
        assert len(mix["tokens"]["per_seed"]) == 2 and all(t > 0 for t in mix["tokens"]["per_seed"])
        assert set(mix["cost"]) == {"seconds", "tokens", "fine_tunes", "what"}
        loss = mix["results"]["test"]["loss"]
        assert loss["mean"] == pytest.approx(sum(loss["per_seed"]) / 2)
        vs = loss.get("vs_baseline")
        if name == "uniform":
            assert vs is None
            continue
        base = doc["mixes"]["uniform"]["results"]["test"]["loss"]["per_seed"]
        assert vs["per_seed"] == pytest.approx([a - b for a, b in zip(loss["per_seed"], base)])
        assert vs["diff_mean"] == pytest.approx(sum(vs["per_seed"]) / 2)
        assert vs["ci95"][0] < vs["diff_mean"] < vs["ci95"][1]
    assert doc["mixes"]["uniform"]["cost"]["seconds"] == 0 and doc["mixes"]["solo"]["cost"]["seconds"] == 0
    assert "no manifest" in doc["mixes"]["big"]["cost"]["what"]
    # the base model before fine-tuning: its own row; every mix trained below it
    base_loss = doc["base"]["results"]["test"]["loss"]
    assert all(m["results"]["test"]["loss"]["mean"] < base_loss for m in doc["mixes"].values())
    table = (out / "compare.md").read_text()
    assert "| base (before fine-tuning) |" in table and "| uniform (baseline) |" in table and "vs uniform" in table


def test_a_larger_file_mix_is_subsampled_per_seed_and_a_source_mix_draws_one_source(run: Run, files: Path) -> None:
    cells = run.out / "cells"
    big = set((files / "big.jsonl").read_text().splitlines())
    draws = [(cells / f"big-seed{s}" / "sample.jsonl").read_text().splitlines() for s in (0, 1)]
    assert all(len(d) == 12 and set(d) <= big for d in draws) and set(draws[0]) != set(draws[1])
    solo = [json.loads(line) for line in (cells / "solo-seed0" / "sample.jsonl").read_text().splitlines()]
    assert len(solo) == 12 and {r["source"] for r in solo} == {"clean"}
    weighted = [json.loads(line) for line in (cells / "scalebio-seed0" / "sample.jsonl").read_text().splitlines()]
    assert sum(r["source"] == "clean" for r in weighted) == 10  # round(12 x 0.8)


def test_rerun_reuses_every_finished_cell(run: Run) -> None:
    assert run.again.stderr.count("reusing the finished cell") == 8
    assert "reusing the base model's evaluation" in run.again.stderr
    assert "saved" not in run.again.stderr
    cells = run.out / "cells"
    assert {c: (cells / c / "eval.json").stat().st_mtime_ns for c in run.mtimes} == run.mtimes
    assert json.loads((run.out / "compare.json").read_text())["mixes"] == run.doc["mixes"]


def test_report_renders_v2_and_v1(run: Run, tmp_path: Path) -> None:
    assert run.report.returncode == 0, run.report.stderr
    page = (run.out / "report.html").read_text()
    assert "Mixture comparison" in page and "base (before fine-tuning)" in page and "data:image/png;base64," in page
    old = tmp_path / "v1"
    old.mkdir()
    (old / "compare.json").write_text(json.dumps({
        "format": "scalebio-compare/1", "seeds": [0, 1], "num_samples": 4,
        "mixes": {"a": {"spec": "uniform", "results": {"t": {"loss": {"mean": 1.0, "std": 0.1,
                                                                      "per_seed": [0.9, 1.1]}}}}}}))
    result = invoke("report", old)
    assert result.returncode == 0, result.stderr
    assert "1.0000 ± 0.1000" in (old / "report.html").read_text()


@pytest.fixture
def small(demo: Path, files: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """A compare of its own files (a weights file and a test file the test may rewrite): scalebio and uniform,
    seed 0, 8 records; run once."""
    _weights(demo, tmp_path / "weights.json")
    shutil.copy(files / "test.jsonl", tmp_path / "test.jsonl")
    args = [*_args(files, tmp_path / "cmp", f"scalebio={tmp_path / 'weights.json'}", "uniform",
                   test=tmp_path / "test.jsonl"), "-n", "8", "--seeds", "0"]
    first = invoke(*args)
    assert first.returncode == 0, first.stderr
    return args, tmp_path


def test_rewritten_inputs_at_the_same_path_are_never_reused(demo: Path, small: tuple[list[str], Path]) -> None:
    args, root = small
    out = root / "cmp"
    one_seed = json.loads((out / "compare.json").read_text())
    assert one_seed["mixes"]["scalebio"]["results"]["test"]["loss"]["std"] is None  # one seed: no spread, no +-0
    assert one_seed["mixes"]["scalebio"]["results"]["test"]["loss"]["vs_baseline"]["ci95"] is None
    assert "(one seed: no interval)" in (out / "compare.md").read_text()
    # the test file's contents change: every cell is evaluated again, no fine-tuning is redone
    lines = (root / "test.jsonl").read_text().splitlines(keepends=True)
    (root / "test.jsonl").write_text("".join(lines[:12]))
    again = invoke(*args)
    assert again.returncode == 0, again.stderr
    assert "reusing the finished cell" not in again.stderr and "saved" not in again.stderr
    doc = json.loads((out / "compare.json").read_text())
    assert doc["base"]["results"]["test"]["num_examples"] == 12
    assert json.loads((out / "cells" / "uniform-seed0" / "eval.json").read_text())["results"]["test"][
        "num_examples"] == 12
    # the weights file is rewritten at the same path (same mtime): refused, naming what changed; nothing touched
    stat = os.stat(root / "weights.json")
    _weights(demo, root / "weights.json", {"clean": 0.1, "noisy": 0.8, "offtopic": 0.1})
    os.utime(root / "weights.json", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    sample = (out / "cells" / "scalebio-seed0" / "sample.jsonl").read_text()
    refused = invoke(*args)
    assert refused.returncode == 2 and "finished from other inputs" in refused.stderr, refused.stderr
    assert "weights file" in refused.stderr and "--force" in refused.stderr and "Traceback" not in refused.stderr
    assert (out / "cells" / "scalebio-seed0" / "sample.jsonl").read_text() == sample
    forced = invoke(*args[:args.index("--mix") + 2], *args[args.index("--test"):], "--force")  # scalebio only
    assert forced.returncode == 0, forced.stderr
    redone = [json.loads(x) for x in (out / "cells" / "scalebio-seed0" / "sample.jsonl").read_text().splitlines()]
    assert sum(r["source"] == "noisy" for r in redone) == 6  # round(8 x 0.8): the new weights


def _fake_stages(calls: list[str], fail: str | None = None) -> SimpleNamespace:
    """A finetune that writes a model folder (or raises where `fail` says) and an eval that writes a loss."""
    from scalebio_cli.stages import sample

    def finetune(recipe, resume, force):
        calls.append(f"finetune lr={recipe.finetune.lr}")
        if fail == "finetune":
            raise KeyboardInterrupt
        Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(recipe.output_dir) / "config.json").write_text("{}")

    def evaluate(model, tests, output, **_):
        calls.append(f"eval {model}")
        if fail == "eval" and "finetune" in model:
            raise KeyboardInterrupt
        output.write_text(json.dumps({"results": {"test": {"loss": 1.0 + len(calls) / 100}}}))
        return json.loads(output.read_text())

    return SimpleNamespace(sample=sample, finetune=SimpleNamespace(run=finetune), evaluate=SimpleNamespace(
        run=evaluate))


@pytest.mark.parametrize("where", ["finetune", "eval"])
def test_an_interrupted_then_changed_cell_is_never_mislabelled(files: Path, tmp_path: Path, where: str) -> None:
    """Interrupted during its fine-tuning, the cell reruns under new settings from scratch (never resumed); during
    its evaluation (fine-tuning finished), a rerun under new settings is refused: the model is the old settings'."""
    from scalebio_cli.comparing.cells import Comparison
    from scalebio_cli.comparing.mixes import Mix
    from scalebio_cli.errors import InputError
    from scalebio_cli.recipe import load_recipe
    from scalebio_cli.stages import compare

    def comparison(lr: str, force: bool = False) -> Comparison:
        recipe = load_recipe(files / "recipe.yaml", [f"finetune.lr={lr}"])
        return Comparison(recipe, {"uniform": Mix("uniform", "uniform", "uniform")},
                          {"test": str(files / "test.jsonl")}, 8, [0], tmp_path / "out", force=force)

    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        compare.run(comparison("3e-3"), _fake_stages(calls, fail=where))
    cell = tmp_path / "out" / "cells" / "uniform-seed0"
    if where == "finetune":
        compare.run(comparison("1e-3"), _fake_stages(calls))
        assert calls[-2:] == ["finetune lr=0.001", f"eval {cell / 'finetune' / 'model'}"]
        recorded = json.loads((cell / "cell.json").read_text())["key"]["settings"]["train"]["finetune"]
        assert recorded["finetune.lr"] == 0.001
    else:
        assert not (cell / "cell.json").exists() or "eval.json" not in os.listdir(cell)
        with pytest.raises(InputError, match=r"finetune\.lr"):
            compare.run(comparison("1e-3"), _fake_stages(calls))
        assert not (cell / "eval.json").exists()
        compare.run(comparison("1e-3", force=True), _fake_stages(calls))
        assert calls[-2] == "finetune lr=0.001"


def test_match_tokens_gives_every_mix_the_same_tokens(files: Path, tmp_path: Path) -> None:
    from scalebio_cli.comparing.cells import Comparison
    from scalebio_cli.comparing.mixes import parse_mixes
    from scalebio_cli.recipe import load_recipe
    from scalebio_cli.stages import compare

    recipe = load_recipe(files / "recipe.yaml", [])
    mixes = parse_mixes(["uniform", "solo=source:offtopic"])
    c = Comparison(recipe, mixes, {"test": str(files / "test.jsonl")}, 12, [0, 1], tmp_path / "out",
                   match="tokens")
    doc = json.loads(compare.run(c, _fake_stages([])).read_text())
    cells = tmp_path / "out" / "cells"
    for seed in (0, 1):
        drawn = {m: sum(json.loads((cells / f"{m}-seed{seed}" / "draw.json").read_text())["tokens_per_record"])
                 for m in mixes}
        budget = min(drawn.values())
        for name, mix in doc["mixes"].items():
            per = json.loads((cells / f"{name}-seed{seed}" / "draw.json").read_text())["tokens_per_record"]
            got = mix["tokens"]["per_seed"][seed]
            k = mix["records"]["per_seed"][seed]
            assert got >= budget and sum(per[:k - 1]) < budget and sum(per[:k]) == got  # the shortest prefix
            assert len((cells / f"{name}-seed{seed}" / "train.jsonl").read_text().splitlines()) == k
    assert doc["match"] == "tokens" and "same response tokens per seed" in (tmp_path / "out" / "compare.md").read_text()


@pytest.mark.parametrize(("mix", "n", "message"), [
    ("solo=source:clean", "100000", "--mix solo: -n 100,000 cannot be drawn without repeating records"),
    ("big={files}/big.jsonl", "41", "holds 40 records"),
    ("uniform", "100000", "ask for --num-samples"),
    ("a=missing.json", "4", "--mix a: file not found"),
    ("noname", "4", "--mix 'noname': expected NAME=SPEC"),
    ("x=source:nope", "4", "not a source of data.sources"),
])
def test_bad_or_infeasible_mix_exits_2_before_any_cell(files: Path, tmp_path: Path, mix: str, n: str,
                                                       message: str) -> None:
    result = invoke(*_args(files, tmp_path / "cmp", mix.format(files=files)), "-n", n)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "cmp").exists()


def test_the_largest_feasible_n_is_named(files: Path, tmp_path: Path) -> None:
    result = invoke(*_args(files, tmp_path / "cmp", f"big={files / 'big.jsonl'}"), "-n", "41")
    assert "ask for --num-samples 40 or fewer" in result.stderr, result.stderr


def test_paired_statistics() -> None:
    from scalebio_cli.results import paired

    assert paired.t975(1) == 12.706 and paired.t975(30) == 2.042 and paired.t975(200) == pytest.approx(1.972, abs=1e-3)
    vs = paired.versus([1.0, 2.0, 3.0], [0.5, 1.0, 2.0])
    assert vs["per_seed"] == [0.5, 1.0, 1.0] and vs["diff_mean"] == pytest.approx(2.5 / 3)
    half = 4.303 * (0.2886751 / 3 ** 0.5)
    assert vs["ci95"] == pytest.approx([2.5 / 3 - half, 2.5 / 3 + half], abs=1e-5)
    single = paired.versus([1.0], [0.5])
    assert single["ci95"] is None and "undefined" in single["note"]
    mixes = {n: {"results": {"t": {"loss": {"mean": sum(v) / 2, "std": abs(v[0] - v[1]) / 2 ** 0.5,
                                            "per_seed": v}}}} for n, v in
             {"a": [1.00, 1.10], "b": [1.02, 1.09]}.items()}
    ceiling = paired.ceiling(mixes, ["a", "b"], "t")
    assert ceiling["inside_noise"] is True and "no mixture of them can matter much" in paired.ceiling_sentence(
        ceiling)
    base = {"t": {"loss": 1.051}}
    warnings = paired.untrained_warnings(mixes, base)
    assert len(warnings) == 2 and "barely trained" in warnings[0]
    assert paired.untrained_warnings(mixes, {"t": {"loss": 3.0}}) == []


def test_a_signal_during_a_cells_last_step_stops_before_the_next_cell(files: Path, tmp_path: Path) -> None:
    """SIGTERM while a cell's fine-tuning takes its last step: that fine-tuning finishes (finishing beats a
    checkpoint) and compare stops before the next cell instead of going on (the stage's handler passes the signal
    out); the finished cell is kept for the rerun."""
    import signal

    from scalebio_cli.comparing.cells import Comparison
    from scalebio_cli.comparing.mixes import Mix
    from scalebio_cli.errors import TrainingStopped
    from scalebio_cli.recipe import load_recipe
    from scalebio_cli.stages import compare
    from scalebio_cli.train.stopping import StopSignals

    calls = []
    before = signal.getsignal(signal.SIGTERM)
    stages = _fake_stages([])

    def finetune(recipe, resume, force):  # a fine-tuning whose last step receives SIGTERM
        with StopSignals().installed():
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(recipe.output_dir)
        Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(recipe.output_dir) / "config.json").write_text("{}")

    stages.finetune = SimpleNamespace(run=finetune)
    recipe = load_recipe(files / "recipe.yaml", [])
    mix = Mix("file", str(files / "big.jsonl"), "file")
    c = Comparison(recipe, {"file": mix}, {"test": str(files / "test.jsonl")}, 8, [0, 1], tmp_path / "out")
    with pytest.raises(TrainingStopped, match="after 1 of 2 cells") as stopped:
        compare.run(c, stages)
    assert stopped.value.signal == "SIGTERM" and len(calls) == 1
    assert (tmp_path / "out" / "cells" / "file-seed0" / "eval.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is before  # compare's handler is gone again
