"""`scalebio export` and `sample --format/.parquet`: every export loads in its consumer or validates against the
consumer's documented schema, and the probabilities it realises are the weights (same order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from scalebio_cli.stages import export

# LLaMA-Factory's DatasetAttr (src/llamafactory/data/parser.py): the keys a dataset_info entry may carry.
LLAMAFACTORY_KEYS = {"hf_hub_url", "ms_hub_url", "script_url", "file_name", "file_sha1", "subset", "folder",
                     "ranking", "formatting", "columns", "tags", "split", "num_samples", "revision"}
LLAMAFACTORY_TAGS = {"role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag",
                     "system_tag"}
# axolotl's SFTDataset (src/axolotl/utils/schemas/datasets.py) fields used here, and `weight` (0 < w <= 1).
AXOLOTL_KEYS = {"path", "split", "type", "ds_type", "data_files", "field_messages", "weight", "name",
                "message_property_mappings", "roles_to_train", "chat_template"}


@pytest.fixture(scope="module")
def weights(reweighted: Path) -> tuple[Path, list[str], list[float]]:
    path = reweighted / "weights.json"
    doc = json.loads(path.read_text())
    return path, list(doc["weights"]), list(doc["weights"].values())


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hf_export_loads_with_datasets_and_interleaves(weights, tmp_path: Path) -> None:
    import datasets

    path, names, probs = weights
    result = run_cli("export", str(path), "--to", "hf", "-o", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    out = Path(result.stdout.strip())
    mix = json.loads((out / "mixture.json").read_text())
    assert mix["sources"] == names
    assert max(abs(a - b) for a, b in zip(mix["probabilities"], probs)) < 1e-6
    parts = [datasets.load_dataset("json", data_files=f, split="train", cache_dir=str(tmp_path / "cache"))
             for f in mix["files"]]
    assert [len(p) for p in parts] == [600, 600, 600]
    assert all(p.column_names == ["messages"] for p in parts)  # one schema, whatever the source format
    mixed = datasets.interleave_datasets(parts, probabilities=mix["probabilities"], seed=0,
                                         stopping_strategy=mix["stopping_strategy"])
    assert {m["role"] for m in mixed[0]["messages"]} <= {"user", "assistant", "system"}
    readme = (out / "README.md").read_text()
    # one stopping rule in every export: the first source to run out ends the mixture (LLaMA-Factory's default)
    assert "interleave_datasets" in readme and 'stopping_strategy="first_exhausted"' in readme
    assert "all_exhausted\")" not in readme and mix["stopping_strategy"] == "first_exhausted"


def _sharegpt_ok(messages: list[dict], tags: dict) -> bool:
    """LLaMA-Factory's SharegptDatasetConverter rules: optional system first, then user/assistant alternating,
    an even number of turns (it skips other records)."""
    if messages and messages[0][tags["role_tag"]] == tags["system_tag"]:
        messages = messages[1:]
    expected = [tags["user_tag"], tags["assistant_tag"]]
    return (len(messages) % 2 == 0 and len(messages) > 0
            and all(m[tags["role_tag"]] == expected[i % 2] for i, m in enumerate(messages)))


def test_llamafactory_export_matches_its_dataset_info_schema(weights, tmp_path: Path) -> None:
    path, names, probs = weights
    out = export.run(path, "llamafactory", tmp_path / "lf")
    info = json.loads((out / "dataset_info.json").read_text())
    config = yaml.safe_load((out / "llamafactory.yaml").read_text())
    datasets_ = config["dataset"].split(",")
    assert datasets_ == names and set(info) == set(names)
    assert config["mix_strategy"] == "interleave_under" and Path(config["dataset_dir"]) == out
    interleave = [float(p) for p in config["interleave_probs"].split(",")]
    assert len(interleave) == len(datasets_)
    assert max(abs(a - b) for a, b in zip(interleave, probs)) < 1e-6
    for name in names:
        entry = info[name]
        assert set(entry) <= LLAMAFACTORY_KEYS and set(entry["tags"]) <= LLAMAFACTORY_TAGS
        assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "messages"}
        records = jsonl(out / entry["file_name"])
        assert len(records) == 600
        assert all(_sharegpt_ok(r["messages"], entry["tags"]) for r in records)


def test_axolotl_fractions_realise_the_weights(weights, tmp_path: Path) -> None:
    path, names, probs = weights
    out = export.run(path, "axolotl", tmp_path / "ax")
    text = (out / "axolotl.yaml").read_text()
    entries = yaml.safe_load(text)["datasets"]
    assert [Path(e["path"]).stem for e in entries] == names
    sizes = [len(jsonl(Path(e["path"]))) for e in entries]
    for e in entries:
        assert set(e) <= AXOLOTL_KEYS and e["type"] == "chat_template" and e["ds_type"] == "json"
        assert 0 < e["weight"] <= 1
    assert max(e["weight"] for e in entries) == 1.0
    kept = [round(e["weight"] * n) for e, n in zip(entries, sizes)]
    assert f"about {sum(kept):,} records in all" in text  # said in the fragment (and logged)
    realised = [k / sum(kept) for k in kept]
    assert max(abs(r - p) for r, p in zip(realised, probs)) <= len(names) / sum(kept)  # whole records


def test_open_instruct_counts_realise_the_weights(weights, tmp_path: Path) -> None:
    path, names, probs = weights
    out = export.run(path, "open-instruct", tmp_path / "oi")
    mixer = yaml.safe_load((out / "open-instruct.yaml").read_text())["dataset_mixer_list"]
    assert len(mixer) == 2 * len(names)
    files, counts = mixer[::2], mixer[1::2]
    assert all(isinstance(c, str) and "." not in c for c in counts)  # open-instruct: no dot = a record count
    counts = [int(c) for c in counts]
    records = [jsonl(Path(f)) for f in files]
    assert all(c <= len(r) for c, r in zip(counts, records))  # the default mixture repeats no record
    assert max(abs(c / sum(counts) - p) for c, p in zip(counts, probs)) <= 1 / sum(counts)
    assert all("messages" in r for r in records[0])
    fixed = export.run(path, "open-instruct", tmp_path / "oi-n", opts=export.Options(num_samples=1000))
    counts_n = [int(c) for c in yaml.safe_load((fixed / "open-instruct.yaml").read_text())["dataset_mixer_list"][1::2]]
    assert sum(counts_n) == 1000


def test_megatron_blend_and_nemo_config(weights, tmp_path: Path) -> None:
    path, names, probs = weights
    out = export.run(path, "megatron", tmp_path / "mg")
    tokens = (out / "data-path.txt").read_text().split()
    assert len(tokens) == 2 * len(names)
    assert max(abs(float(w) - p) for w, p in zip(tokens[::2], probs)) < 1e-6
    assert [Path(t).name for t in tokens[1::2]] == [f"{n}_text_document" for n in names]
    texts = jsonl(out / "clean.jsonl")
    assert len(texts) == 600 and all(isinstance(r["text"], str) and "<|im_start|>assistant" in r["text"]
                                     for r in texts)

    out = export.run(path, "nemo", tmp_path / "nemo")
    train_ds = yaml.safe_load((out / "nemo.yaml").read_text())["model"]["data"]["train_ds"]
    assert len(train_ds["file_names"]) == len(train_ds["concat_sampling_probabilities"]) == len(names)
    assert max(abs(a - b) for a, b in zip(train_ds["concat_sampling_probabilities"], probs)) < 1e-6
    for file in train_ds["file_names"]:
        for r in jsonl(Path(file)):
            assert r["mask"] == "User" and isinstance(r["system"], str)
            assert [t["from"] for t in r["conversations"]] == ["User", "Assistant"]


def test_bad_input_exits_2_with_no_output(weights, tmp_path: Path) -> None:
    path, _, _ = weights
    broken = tmp_path / "w.json"
    doc = json.loads(Path(path).read_text())
    doc["weights"]["clean"] = 2.0
    broken.write_text(json.dumps(doc))
    result = run_cli("export", str(broken), "--to", "hf", "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "weights.clean = 2.0 is outside [0, 1]" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()

    # a conversation LLaMA-Factory would skip (two user turns in a row): refused, naming the record
    source = tmp_path / "odd.jsonl"
    source.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                               {"role": "assistant", "content": "c"}]}) + "\n")
    from scalebio_cli.files import file_sha256

    doc = json.loads(Path(path).read_text())
    doc["sources"]["clean"] = {"path": str(source), "num_examples": 1, "sha256": file_sha256(source)}
    doc["config"]["data"]["sources"]["clean"] = str(source)  # consistent, as a run on that file would write it
    odd = tmp_path / "odd-weights.json"
    odd.write_text(json.dumps(doc))
    result = run_cli("export", str(odd), "--to", "llamafactory", "-o", str(tmp_path / "lf"))
    assert result.returncode == 2 and f"{source}:1: not an alternating user/assistant conversation" in result.stderr
    assert not (tmp_path / "lf").exists() and not list(tmp_path.glob(".lf*"))
    assert run_cli("export", str(path), "--to", "nope").returncode == 2


def test_sample_messages_parquet_has_one_schema(weights, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    path, names, _ = weights
    out = tmp_path / "x.parquet"
    result = run_cli("sample", "--weights", str(path), "-n", "300", "--format", "messages", "-o", str(out),
                     "--replacement")
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out)
    assert table.num_rows == 300 and table.column_names == ["messages", "source"]
    rows = table.to_pylist()
    assert all(r["messages"] and r["messages"][-1]["role"] == "assistant" and r["source"] in names for r in rows)
    manifest = json.loads((tmp_path / "x.manifest.json").read_text())
    assert sum(manifest["counts"].values()) == 300 and manifest["format"] == "messages"

    original = tmp_path / "o.parquet"  # three record schemas in one file: their columns unified, nulls elsewhere
    assert run_cli("sample", "--weights", str(path), "-n", "60", "-o", str(original), "--seed", "1").returncode == 0
    columns = set(pq.read_table(original).column_names)
    assert {"messages", "instruction", "prompt", "source"} <= columns
    assert run_cli("sample", "--weights", str(path), "-n", "5", "--format", "xml", "-o", str(tmp_path / "y.jsonl"),
                   ).returncode == 2


def test_several_targets_export_each_or_are_refused_clearly(weights, tmp_path: Path) -> None:
    import shutil

    path = weights[0]
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(path, run / "weights.json")
    result = run_cli("export", str(run / "weights.json"), "--to", "hf", "--to", "nemo")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(run / "export-hf"), str(run / "export-nemo")]
    assert (run / "export-hf" / "mixture.json").is_file() and (run / "export-nemo" / "nemo.yaml").is_file()
    config = yaml.safe_load(export.run(path, "llamafactory", tmp_path / "lf").joinpath("llamafactory.yaml")
                            .read_text())
    assert config["mix_strategy"] == "interleave_under"  # the same stopping rule as the hf export's
    for args, message in [(["--to", "hf", "--to", "hf"], "--to hf: given twice"),
                          (["--to", "hf", "--to", "axolotl", "-o", str(tmp_path / "one")],
                           "--output names one folder, but 2 targets were given")]:
        refused = run_cli("export", str(path), *args)
        assert refused.returncode == 2 and message in refused.stderr and refused.stdout == ""
    assert not (tmp_path / "one").exists()


def test_export_log_says_how_sure_the_run_was(weights, tmp_path: Path) -> None:
    """The evidence of the exported weights is in the export's log; a weights file without it (an earlier version)
    or with a hand-edited one that does not read exports the same, without the lines."""
    from conftest import invoke

    path, names, _ = weights
    result = invoke("export", str(path), "--to", "hf", "-o", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert "evidence" in result.stderr and all(f"{n}: " in result.stderr for n in names)
    assert " z " in result.stderr
    doc = json.loads(path.read_text())
    doc["evidence"] = {names[0]: "tampered"}
    edited = tmp_path / "run" / "weights.json"
    edited.parent.mkdir()
    edited.write_text(json.dumps(doc))
    result = invoke("export", str(edited), "--to", "hf", "-o", str(tmp_path / "hf2"))
    assert result.returncode == 0, result.stderr
    assert "evidence" not in result.stderr
