"""The mixture at work while fine-tuning: training loss per source, validation loss per named set (metrics.jsonl,
TensorBoard, the report page), loss per source in `eval`, and finetune's refusal of another stage's folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import invoke, run_cli, write_demo_weights, write_recipe

FT = {"epochs": 1, "lr": 3e-3, "batch_size": 16, "micro_batch_size": 4, "log_every": 2, "eval_every": 3}
SOURCES = ("clean", "noisy", "offtopic")


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sampled(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 records of the three demo sources, each with its `source` field, as `sample` writes them."""
    out = tmp_path_factory.mktemp("sampled") / "mix.jsonl"
    data = demo / "data"
    result = invoke("sample", "--weights", "uniform", "-n", "96", "--output", str(out),
                    "--sources", f"clean={data / 'clean.jsonl'}", "--sources", f"noisy={data / 'noisy.json'}",
                    "--sources", f"offtopic={data / 'offtopic.parquet'}")
    assert result.returncode == 0, result.stderr
    return out


def sources_recipe(folder: Path, demo: Path, sampled: Path, **extra: object) -> Path:
    validation = {"val": {"path": str(demo / "data" / "val.jsonl"), "max_samples": 60},
                  "test": {"path": str(demo / "data" / "test.jsonl"), "max_samples": 40}}
    return write_recipe(folder / "recipe.yaml", demo, finetune={**FT, "data": str(sampled), "validation": validation},
                        **extra)


@pytest.fixture(scope="module")
def by_source(demo: Path, sampled: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """6 steps on the sample, two named validation sets, TensorBoard on: (output_dir, the log)."""
    recipe = sources_recipe(tmp_path_factory.mktemp("by_source"), demo, sampled, report_to=["tensorboard"])
    result = invoke("finetune", "--config", str(recipe))
    assert result.returncode == 0, result.stderr
    return recipe.parent / "run", result.stderr


def test_finetune_writes_the_loss_per_source_and_per_validation_set(by_source, sampled: Path) -> None:
    out, log = by_source
    metrics = metrics_of(out)
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train] == [2, 4, 6]
    for m in train:
        per_source = m["train_loss_by_source"]
        assert set(per_source) <= set(SOURCES) and len(per_source) >= 2
        assert all(math.isfinite(v) and v > 0 for v in per_source.values())
        # the sources' token-weighted means average back to the batch's loss: between their smallest and largest
        assert min(per_source.values()) - 1e-6 <= m["loss"] <= max(per_source.values()) + 1e-6
    val = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in val] == [0, 3, 6]
    assert all(set(m["val_loss"]) == {"val", "test"} for m in val)
    assert val[-1]["val_loss"]["val"] < val[0]["val_loss"]["val"]
    assert "training loss per source every 2 steps: clean, noisy, offtopic" in log
    assert "val val " in log and " · test " in log  # the progress lines name the sets
    assert "validation loss val " in log


def test_loss_per_source_is_token_weighted_within_the_global_batch(by_source, sampled: Path, demo: Path) -> None:
    """The steps' batches rebuilt from the seed: each source's mean, weighted by its response tokens in the step's
    global batch, gives back the step's loss."""
    from scalebio_cli.data.read.source_labels import from_field
    from scalebio_cli.data.read.sources import from_path
    from scalebio_cli.data.tokens.render import Renderer
    from scalebio_cli.data.tokens.tokenized import load_tokenized
    from scalebio_cli.stages.finetune import TrainStream
    from scalebio_cli.train.modeling import load_tokenizer

    out, _ = by_source
    data = load_tokenized(sampled, Renderer(load_tokenizer(str(demo / "model")), 64))
    labels, note = from_field(from_path("x", sampled), data.record_index)
    assert note == "" and labels is not None and labels.names == list(SOURCES)
    stream = TrainStream([data], [1.0], seed=0)
    lines = {m["step"]: m for m in metrics_of(out) if "loss" in m}
    for step in range(6):
        items = stream.take(step, FT["batch_size"])
        if step + 1 not in lines:
            continue
        tokens = [0] * 3
        for (_, i), label in zip(items, labels.of(items)):
            tokens[label] += int(data.example(i)[1][1:].sum())
        line = lines[step + 1]
        per = line["train_loss_by_source"]
        assert set(per) == {SOURCES[k] for k in range(3) if tokens[k]}
        weighted = sum(per[SOURCES[k]] * tokens[k] for k in range(3) if tokens[k]) / sum(tokens)
        assert weighted == pytest.approx(line["loss"], rel=1e-5)


def test_tensorboard_gets_train_and_val_loss_tags(by_source) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = by_source
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    metrics = metrics_of(out)
    last = [m for m in metrics if "train_loss_by_source" in m][-1]
    assert {f"train/loss/{s}" for s in last["train_loss_by_source"]} | {"val/loss/val", "val/loss/test"} <= tags
    points = acc.Scalars("val/loss/test")
    assert [p.step for p in points] == [0, 3, 6]
    final = [m for m in metrics if "val_loss" in m][-1]["val_loss"]["test"]
    assert points[-1].value == pytest.approx(final, rel=1e-6)


def test_report_draws_a_fine_tune_run(by_source, tmp_path: Path) -> None:
    out, _ = by_source
    page = tmp_path / "ft.html"
    result = invoke("report", str(out), "--output", str(page))
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert "Fine-tuning run report" in text
    for title in ("Training loss per source", "Validation loss per set"):
        assert f'alt="{title}"' in text
    for name in (*SOURCES, "val", "test"):
        assert f"<td>{name}</td>" in text  # the final-value tables
    assert text.count("data:image/png;base64,") >= 3  # per source, per set, learning rate


def test_eval_reports_loss_per_source(by_source, sampled: Path, demo: Path, tmp_path: Path) -> None:
    out, _ = by_source
    result_file = tmp_path / "eval.json"
    result = invoke("eval", "--model", str(out), "--data", f"mix={sampled}",
                    "--data", f"test={demo / 'data' / 'test.jsonl'}", "--output", str(result_file),
                    "--max-length", "64")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result_file.read_text())
    mix = doc["results"]["mix"]
    per = mix["by_source"]
    assert set(per) == set(SOURCES)
    assert sum(p["num_examples"] for p in per.values()) == mix["num_examples"]
    assert sum(p["num_tokens"] for p in per.values()) == mix["num_tokens"]
    weighted = sum(p["loss"] * p["num_tokens"] for p in per.values()) / mix["num_tokens"]
    assert weighted == pytest.approx(mix["loss"], rel=1e-6)  # float32 per-example sums, added in another order
    assert "by_source" not in doc["results"]["test"]  # no `source` field there
    assert "mix / clean" in result.stderr  # the table's per-source rows


def test_finetune_with_a_weights_file_reports_the_mixed_sources(demo: Path, tmp_path: Path) -> None:
    names = {"clean": demo / "data" / "clean.jsonl", "noisy": demo / "data" / "noisy.json"}
    w = write_demo_weights(tmp_path / "weights.json", demo, {"clean": 0.5, "noisy": 0.5})
    recipe = write_recipe(tmp_path / "recipe.yaml", demo, finetune={**FT, "weights": str(w),
                                                                     "validation": str(demo / "data" / "val.jsonl")},
                          data={"sources": {n: str(p) for n, p in names.items()}, "max_length": 64})
    result = invoke("finetune", "--config", str(recipe), "finetune.epochs=0.05")  # 4 steps
    assert result.returncode == 0, result.stderr
    metrics = metrics_of(tmp_path / "run")
    assert all(set(m["train_loss_by_source"]) == {"clean", "noisy"} for m in metrics if "loss" in m)
    assert all(isinstance(m["val_loss"], float) for m in metrics if "val_loss" in m)  # one unnamed set: a number


def test_finetune_validation_is_checked_as_data_validation(demo: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", demo, finetune={
        **FT, "data": str(demo / "data" / "clean.jsonl"),
        "validation": {"a": {"path": str(tmp_path / "nope.jsonl")}, "b": {"path": str(demo / "data" / "val.jsonl"),
                                                                          "weight": 2, "split_by": "x"}}})
    result = run_cli("finetune", "--config", str(recipe))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "finetune.validation.b.weight: finetune reports each validation set's loss on its own" in result.stderr
    assert "finetune.validation.b.split_by: only sources are split" in result.stderr
    result = run_cli("finetune", "--config", str(recipe), f"finetune.validation.b={demo / 'data' / 'val.jsonl'}")
    assert result.returncode == 2 and "finetune.validation.a: file not found" in result.stderr
    assert not (tmp_path / "run").exists()


def test_finetune_refuses_a_folder_holding_another_stages_run(demo: Path, tmp_path: Path) -> None:
    """A finished reweight folder: refused with and without --force, nothing in it touched."""
    from scalebio_cli.results import run_folder, weights_file

    folder = tmp_path / "rw"
    folder.mkdir()
    config = {"model": str(demo / "model"), "output_dir": str(folder)}
    weights_file.write(folder / "weights.json", weights_file.build(
        weights={"a": 1.0}, weights_averaged={"a": 1.0}, sources={"a": {"path": "a.jsonl", "num_examples": 1}},
        validation=None, trajectory=[], steps=1, seed=0, model="m", config=config))
    (folder / "metrics.jsonl").write_text('{"step": 1, "L1": 1.0}\n')
    (folder / "recipe.yaml").write_text(yaml.safe_dump(config))
    run_folder.mark_finished(folder, "reweight", folder / "weights.json", config)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    recipe = write_recipe(tmp_path / "recipe.yaml", demo, output_dir=str(folder),
                          finetune={**FT, "data": str(demo / "data" / "clean.jsonl")})
    for extra in ([], ["--force"]):
        result = run_cli("finetune", "--config", str(recipe), *extra)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        message = " ".join(result.stderr.split())
        assert f"output_dir {folder}: holds a reweight run (weights.json, finished.json of stage reweight)" in message
        assert "--force clears only checkpoints" in message and f"output_dir={folder}-finetune" in message
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.slow  # two fine-tunes under torchrun (~1 min on 2 cores)
def test_loss_per_source_is_the_same_with_one_and_two_processes(demo: Path, sampled: Path, tmp_path: Path) -> None:
    runs = {}
    for nproc in (1, 2):
        recipe = sources_recipe(tmp_path / f"p{nproc}", demo, sampled)
        exe = str(Path(sys.executable).parent / "scalebio")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 str(nproc), exe, "finetune", "--config", str(recipe)], capture_output=True, text=True,
                                env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[nproc] = metrics_of(recipe.parent / "run")
    one, two = ([m for m in runs[n] if "loss" in m] for n in (1, 2))
    assert [m["step"] for m in one] == [m["step"] for m in two] == [2, 4, 6]
    for a, b in zip(one, two):
        assert a["train_loss_by_source"].keys() == b["train_loss_by_source"].keys()
        for name, value in a["train_loss_by_source"].items():
            assert b["train_loss_by_source"][name] == pytest.approx(value, rel=1e-5, abs=1e-6)
    val_one, val_two = ([m["val_loss"] for m in runs[n] if "val_loss" in m] for n in (1, 2))
    for a, b in zip(val_one, val_two):
        assert b == pytest.approx(a, rel=1e-5)


def test_recipe_round_trips_named_finetune_validation(tmp_path: Path) -> None:
    from scalebio_cli.recipe import load_recipe
    from scalebio_cli.recipe.load import dump_recipe

    (tmp_path / "a.jsonl").write_text("")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "output_dir": "o", "finetune": {
        "validation": {"gsm": "a.jsonl", "chat": {"path": "a.jsonl", "max_samples": 5}}}}, sort_keys=False))
    recipe = load_recipe(path)
    assert list(recipe.finetune.validation_sets()) == ["gsm", "chat"] and recipe.finetune.named_validation
    assert recipe.to_dict()["finetune"]["validation"]["gsm"] == str(tmp_path / "a.jsonl")  # a path stays a string
    (tmp_path / "again.yaml").write_text(dump_recipe(recipe))
    assert load_recipe(tmp_path / "again.yaml") == recipe
    one = load_recipe(path, [f"finetune.validation={tmp_path / 'a.jsonl'}"])
    assert list(one.finetune.validation_sets()) == ["validation"] and not one.finetune.named_validation
