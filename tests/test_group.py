"""`scalebio group` (CONTRACT v4, "Groups within sources"): one messy file (clean arithmetic, "." answers, an
off-topic task, no labels) grouped by the tiny demo model, the groups read back as sources (`split_by: group`) by
reweight, sample, export and report; every input form reweight reads; cached and resumed features; 1 and 2
processes; bad inputs; the clustering's pieces. The SmolLM2 measurement is scripts/bench_group.py's."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import invoke
from scalebio_cli.errors import InputError
from scalebio_cli.grouping import clustering

RW = {"steps": 10, "alpha": 1, "lr_u": 3e-3, "lr_w": 3e-3, "lr_lambda": 2e-2, "lambda_schedule": "cosine",
      "lambda_delay": 0, "batch_size": 12, "val_batch_size": 4, "micro_batch_size": 32, "log_every": 5,
      "lisa": {"layers": 2, "interval": 10}}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def messy(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """messy.jsonl: 48 clean arithmetic records (messages), 24 with "." answers (alpaca), 24 word-list reversals
    (prompt/completion), shuffled, no labels (labels.json holds them for the test); recipe.yaml reads it; the
    grouped file groups.jsonl from `scalebio group` (min_size 8)."""
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("group")
    data = demo / "data"
    clean = _lines(data / "clean.jsonl")[:48]
    dot = json.loads((data / "noisy.json").read_text())[:24]
    off = pq.read_table(data / "offtopic.parquet").to_pylist()[:24]
    rows = [(r, "clean") for r in clean] + [(r, "dot") for r in dot] + [(r, "off") for r in off]
    random.Random(0).shuffle(rows)
    (root / "messy.jsonl").write_text("".join(json.dumps(r) + "\n" for r, _ in rows))
    (root / "labels.json").write_text(json.dumps([label for _, label in rows]))
    recipe = {"model": str(demo / "model"), "output_dir": str(root / "run"), "seed": 0,
              "data": {"sources": {"messy": str(root / "messy.jsonl")}, "validation": str(data / "val.jsonl"),
                       "max_length": 64},
              "reweight": RW, "group": {"min_size": 8}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = invoke("group", "--config", root / "recipe.yaml", "-o", root / "groups.jsonl")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(root / "groups.jsonl")
    return root


def _purity(groups: list[str], labels: list[str]) -> float:
    counts = Counter(zip(groups, labels))
    return sum(max(n for (g2, _), n in counts.items() if g2 == g) for g in set(groups)) / len(groups)


def test_every_record_unchanged_plus_its_group_and_a_manifest(messy: Path) -> None:
    rows, original = _lines(messy / "groups.jsonl"), _lines(messy / "messy.jsonl")
    assert [{k: v for k, v in r.items() if k != "group"} for r in rows] == original
    groups = [r["group"] for r in rows]
    assert all(g.startswith("messy/g") and len(g) == len("messy/g00") for g in groups)
    labels = json.loads((messy / "labels.json").read_text())
    assert _purity(groups, labels) >= 0.9  # clean, "." and off-topic records land in groups of their own
    manifest = json.loads((messy / "groups.manifest.json").read_text())
    assert manifest["k_chosen_by"] == "silhouette" and str(manifest["k"]) in manifest["k_scores"]
    assert set(manifest["k_scores"]) <= {str(k) for k in (2, 3, 4, 5, 6, 8, 10, 12, 16)}
    assert set(manifest["groups"]) == set(groups) and manifest["num_records"] == 96
    for name, info in manifest["groups"].items():
        assert info["size"] == groups.count(name) >= 8 and info["source"] == "messy"
        assert info["share_of_source"] == pytest.approx(info["size"] / 96)
        assert 1 <= len(info["examples"]) <= 3
        for example in info["examples"]:  # the record at that position, and in this group
            assert example["data"] == original[example["record"]] and groups[example["record"]] == name
    assert sum(c["size"] for c in manifest["clusters"].values()) == 96
    assert manifest["settings"]["min_size"] == 8 and manifest["evidence"].startswith(f"{len(set(groups))} groups")


def test_groups_are_sources_for_reweight_sample_export_and_report(messy: Path) -> None:
    tree = yaml.safe_load((messy / "recipe.yaml").read_text())
    tree["data"]["sources"] = {"all": {"path": str(messy / "groups.jsonl"), "split_by": "group"}}
    (messy / "rw.yaml").write_text(yaml.safe_dump(tree))
    result = invoke("reweight", "--config", messy / "rw.yaml")
    assert result.returncode == 0, result.stderr
    doc = json.loads((messy / "run" / "weights.json").read_text())
    groups = sorted({r["group"] for r in _lines(messy / "groups.jsonl")})
    assert list(doc["weights"]) == [f"all/{g}" for g in groups]
    out = messy / "sample.jsonl"
    result = invoke("sample", "--weights", messy / "run" / "weights.json", "-n", "32", "-o", out)
    assert result.returncode == 0, result.stderr
    sampled = _lines(out)
    assert len(sampled) == 32 and all(r["source"] == f"all/{r['group']}" for r in sampled)
    result = invoke("export", messy / "run" / "weights.json", "--to", "hf")
    assert result.returncode == 0, result.stderr
    mixture = json.loads((messy / "run" / "export-hf" / "mixture.json").read_text())
    assert mixture["sources"] == list(doc["weights"]) and len(mixture["files"]) == len(groups)
    assert sum(len(Path(f).read_text().splitlines()) for f in mixture["files"]) == 96  # each group a dataset
    result = invoke("report", messy / "run")
    assert result.returncode == 0, result.stderr
    page = (messy / "run" / "report.html").read_text()
    assert "<h2>Groups</h2>" in page and "Per source" in page and "all/messy" in page
    assert "Reverse the list" in page  # the off-topic group's example records


@pytest.mark.slow
def test_group_reweight_sample_keeps_mostly_clean_records(messy: Path) -> None:
    """The issue's measure on the tiny model: a third of the file sampled by the weights over its groups holds more
    clean records than the file's half (100 steps; 20 of 32 measured: short of the issue's 80%, which is
    scripts/bench_group.py's to show on SmolLM2)."""
    tree = yaml.safe_load((messy / "recipe.yaml").read_text())
    tree["data"]["sources"] = {"all": {"path": str(messy / "groups.jsonl"), "split_by": "group"}}
    tree["output_dir"] = str(messy / "long")
    tree["reweight"] = {**RW, "steps": 100, "batch_size": 24}
    (messy / "long.yaml").write_text(yaml.safe_dump(tree))
    result = invoke("reweight", "--config", messy / "long.yaml")
    assert result.returncode == 0, result.stderr
    out = messy / "third.jsonl"
    assert invoke("sample", "--weights", messy / "long" / "weights.json", "-n", "32", "-o", out).returncode == 0
    labels = json.loads((messy / "labels.json").read_text())
    label_of = {json.dumps(r, sort_keys=True): lab for r, lab in zip(_lines(messy / "messy.jsonl"), labels)}
    picked = [label_of[json.dumps({k: v for k, v in r.items() if k not in ("group", "source")}, sort_keys=True)]
              for r in _lines(out)]
    assert picked.count("clean") / len(picked) >= 0.6, Counter(picked)  # measured: 20 of 32 (file: half)


def test_every_input_form_reweight_reads(demo: Path, layouts: dict[str, Path], tmp_path: Path) -> None:
    sources = {"gsm": {"path": str(layouts["gsm_repo"]), "max_samples": 20},
               "noisy": {"path": str(layouts["cfg_repo"]), "name": "noisy", "max_samples": 20},
               "words": {"path": str(layouts["saved"]), "columns": {"prompt": "q", "completion": "a"},
                         "max_samples": 20},
               "csv": {"path": str(layouts["csv"]), "max_samples": 20},
               "mix": {"path": str(layouts["mixed"]), "split_by": "category", "max_samples": 10}}
    recipe = {"model": str(demo / "model"), "output_dir": str(tmp_path / "run"),
              "data": {"sources": sources, "max_length": 64}, "group": {"k": "2", "min_size": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "g.parquet"
    result = invoke("group", "--config", tmp_path / "r.yaml", "-o", out, "--format", "messages")
    assert result.returncode == 0, result.stderr
    import pyarrow.parquet as pq

    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 100 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    counts = Counter(r["group"].rsplit("/", 1)[0] for r in rows)
    assert counts == {"gsm": 20, "noisy": 20, "words": 20, "csv": 20, "mix/math": 10, "mix/words": 10}
    assert json.loads(out.with_name("g.manifest.json").read_text())["k_chosen_by"] == "given"
    from scalebio_cli.data.read import sources as S
    from scalebio_cli.data.read.expand import expand
    from scalebio_cli.recipe.schema import SourceSpec

    parts = expand("all", SourceSpec(str(out), split_by="group"), 0)
    assert sum(S.count(p) for p in parts) == 100 and all(p.name.startswith("all/") for p in parts)


def test_features_are_cached_and_resumed(messy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun reads the features from the cache; a chunk lost (an interrupted run) is computed again, and the
    groups come out the same."""
    from scalebio_cli.grouping import features

    monkeypatch.setattr(features, "CHUNK", 40)  # three chunks of the 96 records
    out = messy / "chunked.jsonl"
    assert invoke("group", "--config", messy / "recipe.yaml", "-o", out).returncode == 0
    folder = Path(json.loads(out.with_name("chunked.manifest.json").read_text())["features"]["cache"])
    chunks = sorted(folder.glob("chunk-*.npz"))
    assert len(chunks) == 3
    first = _lines(out)
    chunks[1].unlink()
    before = chunks[0].stat().st_mtime_ns
    result = invoke("group", "--config", messy / "recipe.yaml", "-o", out, "--force")
    assert result.returncode == 0, result.stderr
    assert chunks[1].is_file() and chunks[0].stat().st_mtime_ns == before  # only the lost chunk recomputed
    assert [r["group"] for r in _lines(out)] == [r["group"] for r in first]


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_groups(messy: Path) -> None:
    exe = str(Path(sys.executable).parent / "scalebio")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCALEBIO_CACHE": str(messy / "fresh-cache")}
    out = messy / "two.jsonl"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             exe, "group", "--config", str(messy / "recipe.yaml"), "-o", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["group"] for r in _lines(out)] == [r["group"] for r in _lines(messy / "groups.jsonl")]


def _bad(messy: Path, tmp_path: Path, *args: str, recipe: dict | None = None) -> subprocess.CompletedProcess:
    config = messy / "recipe.yaml"
    if recipe is not None:
        tree = yaml.safe_load(config.read_text())
        tree.update(recipe)
        config = tmp_path / "bad.yaml"
        config.write_text(yaml.safe_dump(tree))
    return invoke("group", "--config", config, *args)


@pytest.mark.parametrize("case, args, recipe, message", [
    ("k one", ["--k", "1"], None, "--k: must be auto or a whole number of groups >= 2, got '1'"),
    ("k text", ["--k", "many"], None, "--k: must be auto or a whole number"),
    ("recipe k", [], {"group": {"k": "x"}}, "group.k: must be auto or a whole number"),
    ("sweep", [], {"group": {"k_sweep": [1, 4]}}, "group.k_sweep: needs numbers of groups >= 2"),
    ("small", [], {"group": {"small": "drop"}}, "group.small: must be one of merge, refuse"),
    ("no sources", [], {"data": {"sources": {}}}, "data.sources: group needs the sources"),
    ("missing file", [], {"data": {"sources": {"a": "nowhere.jsonl"}}}, "file not found"),
])
def test_bad_input_is_refused_before_any_work(messy: Path, tmp_path: Path, case: str, args: list[str],
                                              recipe: dict | None, message: str) -> None:
    out = tmp_path / "out.jsonl"
    result = _bad(messy, tmp_path, "-o", str(out), *args, recipe=recipe)
    assert result.returncode == 2, (case, result.stderr)
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.stderr
    assert not out.exists()


def test_bad_outputs_and_a_group_column(messy: Path, tmp_path: Path) -> None:
    result = _bad(messy, tmp_path, "-o", str(tmp_path / "out.txt"))
    assert result.returncode == 2 and "must end in .jsonl or .parquet" in result.stderr
    result = _bad(messy, tmp_path, "-o", str(messy / "groups.jsonl"))
    assert result.returncode == 2 and "already exists; pass --force" in result.stderr
    result = _bad(messy, tmp_path, "-o", str(messy / "messy.jsonl"), "--force")
    assert result.returncode == 2 and "an input of this command" in " ".join(result.stderr.split())
    grouped = {"data": {"sources": {"g": str(messy / "groups.jsonl")}, "max_length": 64}}
    result = _bad(messy, tmp_path, "-o", str(tmp_path / "again.jsonl"), recipe=grouped)
    assert result.returncode == 2 and "already has a 'group' column" in result.stderr
    assert not (tmp_path / "again.jsonl").exists()


def test_small_groups_refused_with_a_message(messy: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    result = _bad(messy, tmp_path, "-o", str(out), "--k", "12", recipe={"group": {"small": "refuse", "min_size": 20}})
    assert result.returncode == 2, result.stderr
    assert "fewer than group.min_size=20" in " ".join(result.stderr.split()) and "Traceback" not in result.stderr
    assert not out.exists() and not out.with_name("out.manifest.json").exists()


# -- the clustering's pieces ---------------------------------------------------------------------------------------


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 8)) * 10
    truth = np.repeat(np.arange(3), 40)
    hidden = np.hstack([rng.normal(size=(120, 8)), centres[truth] + rng.normal(size=(120, 8))])  # prompt | response
    return hidden.astype(np.float32), truth.astype(float) * 0.01, truth


def test_auto_k_finds_separated_clusters_and_numbers_them_by_loss() -> None:
    hidden, loss, truth = _blobs()
    x = clustering.feature_matrix(hidden, loss, 1.0, 0.0, 0, seed=0)
    assert x.shape == (120, 9)  # the response half, plus the loss column (the prompt weighs 0)
    found = clustering.choose(x, loss, None, [2, 3, 4, 6], 1000, seed=0)
    assert found.k == 3 and max(found.scores, key=found.scores.get) == 3
    assert (found.labels == truth).all()  # numbered by mean loss: truth's loss order
    assert clustering.feature_matrix(hidden, loss, 1.0, 0.5, 4, seed=0).shape == (120, 9)  # 4 + 4 PCA dims + 1


def test_loss_column_is_centred_nats_times_its_weight() -> None:
    hidden = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    loss = np.linspace(1.0, 3.0, 50)
    x = clustering.feature_matrix(hidden, loss, 2.0, 0.0, 0, seed=0)
    assert np.allclose(x[:, -1], 2.0 * (loss - 2.0), atol=1e-5)
    assert x[:, :-1].var(axis=0).sum() == pytest.approx(1.0, rel=1e-4)


def test_small_groups_merge_into_the_nearest_cluster_of_their_source() -> None:
    centroids = np.array([[0.0], [1.0], [10.0]])
    labels = np.array([0] * 10 + [1] * 2 + [2] * 10 + [1] * 10)
    source = np.array([0] * 22 + [1] * 10)
    merged, merges = clustering.merge_small(labels, source, centroids, min_size=5)
    assert merges == [{"source": 0, "from": 1, "into": 0, "records": 2}]
    assert (merged[:12] == 0).all() and (merged[12:22] == 2).all() and (merged[22:] == 1).all()
    with pytest.raises(InputError, match=r"a/g01 would hold 2 records, fewer than group.min_size=5"):
        clustering.refuse_small(labels, source, ["a", "b"], 5)
