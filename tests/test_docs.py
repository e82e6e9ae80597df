"""Docs that stay true (issue #32): the README quickstart runs, every demo figure the docs quote comes from the run
that produced it, and docs/reliability.md lists exactly the catalogue of bad inputs.

The demo figures live in docs/demo-results.json and between `<!-- demo:NAME:begin/end -->` markers, both written
by scripts/write_demo_docs.py (`make docs`). When a test here fails, rerun that script (or, for reliability.md,
scripts/write_reliability_doc.py) and commit what it writes.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, invoke

sys.path.insert(0, str(ROOT / "scripts"))
import write_demo_docs as gen

RECORD = json.loads(gen.RECORD.read_text())
README = (ROOT / "README.md").read_text()
RERUN = "rerun `python scripts/write_demo_docs.py` (make docs) and commit what it writes"


def test_readme_is_short_and_links_the_docs() -> None:
    assert len(README.splitlines()) < 250
    for link in re.findall(r"\]\((docs/[\w.-]+\.md)", README):
        assert (ROOT / link).exists(), link


def test_readme_quickstart_runs_on_the_demo(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quickstart's recipe and commands, verbatim but for a few reweight steps and a small sample, run from a
    folder where `demo/` is the test demo; its first steps give the numbers the generator recorded, so the
    demo figures in the docs were written by this code."""
    recipe, commands = gen.quickstart(README, fast=True)
    (tmp_path / "demo").symlink_to(demo)
    (tmp_path / gen.recipe_name(commands)).write_text(recipe)
    monkeypatch.chdir(tmp_path)
    assert [c[0] for c in commands] == ["reweight", "report", "sample", "finetune", "eval"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.3M model: one thread is fast, and 2 threads on busy cores are ~50x slower
    try:
        for args in commands:
            result = invoke(*args)
            assert result.returncode == 0, f"scalebio {' '.join(args)}:\n{result.stderr}"
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "runs" / "my-run"
    assert (run / "report.html").exists() and (run / "model" / "config.json").exists()
    got, want = gen.reweight_summary(run), RECORD["fast"]
    for name, w in want["weights"].items():
        assert got["weights"][name] == pytest.approx(w, abs=1e-5), f"weights differ from the record: {RERUN}"
        assert got["evidence"][name]["advantage"] == pytest.approx(want["evidence"][name]["advantage"], rel=1e-3,
                                                                   abs=1e-7), f"evidence differs: {RERUN}"


def test_generated_blocks_are_what_the_record_gives() -> None:
    found = {}
    for path in gen.DOCS:
        text = path.read_text()
        found[path.name] = [m.group(2) for m in gen.BLOCK.finditer(text)]
        assert gen.rewrite(path, RECORD) == text, f"{path.name}: a demo block is stale or hand-edited: {RERUN}"
    assert {"weights-json", "log", "demo-cost", "quickstart-cost", "pipeline"} <= set(found["README.md"])
    assert {"weights", "pipeline"} <= set(found["results.md"]) and "export" in found["guide.md"]


def _demo_figures(digits: int) -> set[str]:
    """The demo's figures as the docs would print them (weights with `digits` decimals and more), and figures that
    earlier versions of the docs quoted."""
    demo, figures = RECORD["demo"], set()
    for key in ("weights", "weights_averaged"):
        for value in demo[key].values():
            figures |= {f"{value:.{d}f}" for d in range(digits, 5)}
    for row in RECORD["pipeline"].values():
        figures |= {f"{row['loss']:.4f}", f"{row['loss']:.3f}", f"{row['perplexity']:.2f}"}
    figures |= {p[:6] for p in str(RECORD["exports"]["llamafactory"]["interleave_probs"]).split(",")}
    figures.add(f"{RECORD['exports']['axolotl_kept']} of 1,800")
    stale = {"0.8835", "0.884", "0.877", "679 of 1,800", "2.7775", "2.7743", "3.1253", "16.028", "22.768"}
    return figures | stale


@pytest.mark.parametrize("name", ["README.md", "guide.md", "results.md", "recipes.md", "data.md", "multi-gpu.md",
                                  "internals.md"])
def test_no_demo_figure_outside_a_generated_block(name: str) -> None:
    path = ROOT / name if name == "README.md" else ROOT / "docs" / name
    outside = gen.BLOCK.sub("", path.read_text())
    # README quotes no other weight-like figures; elsewhere 3-decimal figures of other runs may coincide
    figures = _demo_figures(3 if name == "README.md" else 4)
    quoted = sorted(f for f in figures if re.search(rf"(?<![\d.]){re.escape(f)}(?!\d)", outside))
    assert not quoted, f"{name} quotes demo figures outside a generated block: {quoted}"


def test_reliability_doc_lists_the_catalogue() -> None:
    """docs/reliability.md (scripts/write_reliability_doc.py) has one row per case of tests/bad_inputs.py, in
    order, with its description, exit 2 and the message fragments the case expects."""
    from bad_inputs import CASES, HOSTILE

    doc = (ROOT / "docs" / "reliability.md").read_text()
    rows = re.findall(r"^\| `([\w-]+)` \| (.*?) \| (\d+) \| (.*) \|$", doc, re.M)
    stale = "docs/reliability.md is out of date: rerun `python scripts/write_reliability_doc.py`"
    assert [(r[0], r[1]) for r in rows] == [(c.id, c.what) for c in CASES], stale
    for case, (_, _, status, message) in zip(CASES, rows):
        assert status == "2", f"{case.id}: {stale}"
        for fragment in case.expect:
            if "{" not in fragment:
                assert fragment.replace("|", "\\|") in message, f"{case.id}: {fragment!r} not in the doc: {stale}"
    for cls in HOSTILE:
        assert cls.name in doc, stale


def test_reliability_doc_ends_with_the_generators_runs_that_stop_and_their_exit_status() -> None:
    """The "Runs that stop" table is written by scripts/write_reliability_doc.py (fix it there), and the exit status
    it gives for Ctrl-C is the one the CLI returns (tests/test_first_hour.py sends the SIGINT)."""
    import write_reliability_doc

    from scalebio_cli.errors import TrainingStopped

    doc = (ROOT / "docs" / "reliability.md").read_text()
    assert doc.endswith(write_reliability_doc.FOOTER), "rerun `python scripts/write_reliability_doc.py`"
    row = next(line for line in doc.splitlines() if line.startswith("| SIGTERM / SIGINT"))
    assert f"exit status {TrainingStopped('', 'SIGINT').exit_code} after SIGINT" in row
    assert f"{TrainingStopped('', 'SIGTERM').exit_code} after SIGTERM" in row and "exit status 1 with" not in row


def _schema_default(key: str) -> object:
    from scalebio_cli.recipe.schema import Recipe

    value: object = Recipe()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _doc_value(text: str) -> object:
    """A default as docs/recipes.md writes it (`5e-2`, `true`, `4`), as Python reads it; text stays text."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def test_recipes_doc_defaults_are_the_schemas() -> None:
    """Every number or true/false docs/recipes.md gives as a key's default is the schema's default, and so is every
    `KEY > 0` (the default N)` remark (it once said 4 in the table and 2 in the LoRA row)."""
    doc = (ROOT / "docs" / "recipes.md").read_text()
    checked, wrong = 0, []
    for keys, values in re.findall(r"^\| ((?:`[\w.]+`(?:, )?)+) \| ((?:`[^`]*`(?:, )?)+) \|", doc, re.M):
        keys, values = re.findall(r"`([\w.]+)`", keys), re.findall(r"`([^`]*)`", values)
        if len(keys) != len(values):
            continue  # two keys sharing one default (`lr_u`, `lr_w`: `1e-4`) are checked by their first key below
        for key, text in zip(keys, values):
            try:
                default = _schema_default(key)
            except AttributeError:
                continue  # `.alpha`: shorthand for the row's first key's section
            value = _doc_value(text)
            if isinstance(value, (bool, int, float)):
                checked += 1
                if value != default:
                    wrong.append(f"{key}: the doc says {text}, the schema {default!r}")
    for key, text in re.findall(r"`([\w.]+) > 0` \(the default (\w+)\)", doc):
        checked += 1
        if _doc_value(text) != _schema_default(key):
            wrong.append(f"{key}: the doc says the default is {text}, the schema {_schema_default(key)!r}")
    assert checked > 30 and not wrong, wrong


def test_make_test_time_names_the_machine() -> None:
    """The time `make test` takes is stated with the machine it was measured on, and what a busy machine does."""
    line = next(line for line in README.splitlines() if line.startswith("make test "))
    assert re.search(r"\d+m\d\ds on an idle \d+-core, \d+ GiB machine", line), line
    assert "`make test` takes several times longer" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"# \d+m\d\ds on a \d+-core .*\n(?:#.*\n)*test: install", makefile)


def test_recipes_doc_says_what_a_checkpoint_costs_on_disk() -> None:
    """A 135M model's reweight checkpoints took 1.7 GB each unannounced (issue #43): the doc says what one holds
    and that the log gives each one's size (tests/test_first_hour.py checks the log line)."""
    doc = (ROOT / "docs" / "recipes.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `checkpoint.every`"))
    assert re.search(r"SmolLM2-135M .* [\d.]+ GB a checkpoint", row) and "the log gives each checkpoint's size" in row
