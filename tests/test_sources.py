"""Sources where users keep them (CONTRACT.md, v2 additions): Hub repository folders, configurations, save_to_disk,
csv, gzip JSON lines; column maps, common schemas, split_by, max_samples, several weighted validation sets; and the
whole pipeline (reweight, sample, finetune) reading them, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import invoke, run_cli
from scalebio_cli.data.read import sources as S
from scalebio_cli.data.read.expand import expand
from scalebio_cli.errors import InputError
from scalebio_cli.recipe.load import load_recipe
from scalebio_cli.recipe.schema import SourceSpec


def test_every_layout_reads_into_examples(layouts: dict[str, Path]) -> None:
    repo = expand("gsm", SourceSpec(str(layouts["gsm_repo"])), 0)[0]
    assert S.count(repo) == 120 and not repo.is_plain  # two train shards; question/answer detected
    where, example = next(S.iter_examples(repo))
    assert where.endswith("(train) row 0") and example[0].role == "user" and example[1].role == "assistant"
    test = S.DataSource("k", SourceSpec(str(layouts["gsm_repo"]), split="test"))
    assert S.count(test) == 20
    subset = S.DataSource("k", SourceSpec(str(layouts["cfg_repo"]), name="offtopic"))  # query/response
    assert "Reverse the list" in next(S.iter_examples(subset))[1][0].content
    saved = S.DataSource("k", SourceSpec(str(layouts["saved"]), columns={"prompt": "q", "completion": "a",
                                                                         "system": "q"}))
    assert [t.role for t in next(S.iter_examples(saved))[1]] == ["system", "user", "assistant"]
    csv = S.DataSource("k", SourceSpec(str(layouts["csv"])))
    assert S.count(csv) == 120 and next(S.iter_examples(csv))[1][1].content == "."
    assert S.fingerprint(csv) == S.fingerprint(S.DataSource("other", SourceSpec(str(layouts["csv"]))))


def test_split_by_and_max_samples_are_deterministic(layouts: dict[str, Path]) -> None:
    parts = expand("mix", SourceSpec(str(layouts["mixed"]), split_by="category", max_samples=15), seed=3)
    assert [p.name for p in parts] == ["mix/math", "mix/words"] and [S.count(p) for p in parts] == [15, 15]
    again = expand("mix", SourceSpec(str(layouts["mixed"]), split_by="category", max_samples=15), seed=3)
    rows = [S.selected_rows(p).tolist() for p in parts]
    assert rows == [S.selected_rows(p).tolist() for p in again]
    assert all(r % 2 == 0 for r in rows[0]) and all(r % 2 == 1 for r in rows[1])  # math rows are the even ones
    other = expand("mix", SourceSpec(str(layouts["mixed"]), split_by="category", max_samples=15), seed=4)
    assert S.selected_rows(other[0]).tolist() != rows[0]
    back = S.from_record("k", parts[1].path, S.to_record(parts[1]))
    assert back == S.DataSource("k", parts[1].spec, parts[1].name, parts[1].value, 3)
    assert [r for _, r in S.records_at(back, [0, 2])] == [r for i, (_, r) in enumerate(S.iter_records(parts[1]))
                                                          if i in (0, 2)]


def test_recipe_forms_parse_and_record_as_written(tmp_path: Path) -> None:
    tree = {"model": "m", "output_dir": "out", "data": {
        "sources": {"a": "a.jsonl", "gsm": {"path": "openai/gsm8k", "name": "main", "columns": {
            "prompt": "question", "completion": "answer"}}, "mix": {"path": "shards/*.parquet", "split_by": "c"}},
        "validation": {"math": {"path": "v.jsonl", "weight": 3}, "chat": {"path": "w.jsonl", "weight": 1}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    recipe = load_recipe(tmp_path / "r.yaml", ["data.sources.a.max_samples=9"])
    assert recipe.data.sources["gsm"].path == "openai/gsm8k"  # a Hub id stays one
    assert recipe.data.sources["mix"].path == str(tmp_path / "shards" / "*.parquet")
    assert recipe.data.sources["a"] == SourceSpec(str(tmp_path / "a.jsonl"), max_samples=9)
    assert recipe.named_validation and list(recipe.validation_sets()) == ["math", "chat"]
    from scalebio_cli.stages.reweight import validation_weights

    assert validation_weights(recipe) == [0.75, 0.25]
    bad = {**tree, "data": {**tree["data"], "sources": {"a": {"path": "a.jsonl", "colums": {}}}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(InputError, match=r"unknown key 'data.sources.a.colums' \(did you mean"):
        load_recipe(tmp_path / "bad.yaml")


def _recipe(tmp: Path, demo: Path, layouts: dict[str, Path]) -> Path:
    tree = {
        "model": str(demo / "model"), "output_dir": str(tmp / "rw"), "seed": 0,
        "data": {
            "sources": {
                "gsm": {"path": str(layouts["gsm_repo"]), "max_samples": 50},
                "noisy": {"path": str(layouts["cfg_repo"]), "name": "noisy"},
                "words": {"path": str(layouts["saved"]), "columns": {"prompt": "q", "completion": "a"}},
                "mix": {"path": str(layouts["mixed"]), "split_by": "category", "max_samples": 40},
            },
            "validation": {"math": {"path": str(layouts["val_math"]), "weight": 3},
                           "chat": {"path": str(layouts["val_chat"]), "weight": 1}},
            "max_length": 64,
        },
        "reweight": {"steps": 4, "alpha": 1, "lr_u": 3e-3, "lr_w": 3e-3, "lr_lambda": 2e-2, "batch_size": 10,
                     "val_batch_size": 4, "micro_batch_size": 16, "log_every": 2, "lisa": {"layers": 0}},
        "finetune": {"epochs": 0.05, "batch_size": 8, "lr": 1e-3, "lisa": {"layers": 0}},
        "checkpoint": {"every": 0},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_reweight_sample_finetune_from_layouts(tmp_path: Path, demo: Path, layouts: dict[str, Path]) -> None:
    recipe = _recipe(tmp_path, demo, layouts)
    result = invoke("reweight", "--config", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "reading the columns question/answer as prompt/completion" in result.stderr  # the detected schema, said
    doc = json.loads((tmp_path / "rw" / "weights.json").read_text())
    names = ["gsm", "noisy", "words", "mix/math", "mix/words"]
    assert list(doc["weights"]) == names and abs(sum(doc["weights"].values()) - 1) < 1e-6
    assert doc["sources"]["gsm"]["num_examples"] == 50 and doc["sources"]["gsm"]["max_samples"] == 50
    assert doc["sources"]["mix/math"]["num_examples"] == 40 and doc["sources"]["mix/math"]["source"]["value"] == "math"
    assert doc["sources"]["noisy"]["num_examples"] == 120
    assert doc["validation"]["math"]["weight"] == 0.75 and doc["validation"]["chat"]["num_examples"] == 60
    lines = [json.loads(line) for line in (tmp_path / "rw" / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    assert last["L1"] == pytest.approx(0.75 * last["val_loss/math"] + 0.25 * last["val_loss/chat"], rel=1e-5)
    assert "L1" in result.stderr and "math " in result.stderr and "chat " in result.stderr  # per-set losses shown

    out = tmp_path / "sampled.jsonl"
    result = run_cli("sample", "--weights", str(tmp_path / "rw" / "weights.json"), "-n", "30", "-o", str(out),
                     "--replacement", "--format", "messages")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and {r["source"] for r in rows} <= set(names)
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    mix_words = [r for r in rows if r["source"] == "mix/words"]
    assert all(r["messages"][0]["content"].startswith("Reverse") for r in mix_words)  # split_by read back alike

    result = invoke("finetune", "--config", str(recipe), f"finetune.weights={tmp_path / 'rw' / 'weights.json'}",
                    f"output_dir={tmp_path / 'ft'}")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ft" / "config.json").is_file()
