"""`select` under torchrun (gloo, CPU): the pool is scored in shards across processes, the scores gathered, and one
process writes; two processes choose the same records as one. The order of data.sources changes nothing (LESS's
warm-up subset is drawn in source-name order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, invoke

sys.path.insert(0, str(ROOT / "scripts"))  # the cases' data builders (scripts/cases/)


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI under torchrun, one thread a process (as tests/test_distributed.py launches it)."""
    exe = str(Path(sys.executable).parent / "scalebio")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), exe, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """arith / reverse / dot (16 records each), arithmetic validation (20), a 2-block Llama; settings for seconds."""
    from cases.denoising import write_task_case

    from scalebio_cli.tiny import corpus_texts, save_tiny_model

    root = tmp_path_factory.mktemp("select-dist")
    paths = write_task_case(root / "data", per_source=16, num_val=20, seed=1)
    save_tiny_model(root / "model", corpus_texts(list(paths.values())), layers=2, hidden=64, vocab_size=400)
    recipe = {"model": str(root / "model"), "output_dir": str(root / "run"),
              "data": {"sources": {n: str(paths[n]) for n in ("arith", "reverse", "dot")},
                       "validation": str(paths["val"]), "max_length": 48},
              "select": {"rho_loss": {"lr": 1e-2, "min_steps": 12, "holdout_epochs": 6},
                         "less": {"lr": 1e-2, "batch_size": 8, "epochs": 2, "warmup_fraction": 0.5,
                                  "projection_dim": 64, "lora_dropout": 0.0}}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    recipe["data"]["sources"] = dict(reversed(list(recipe["data"]["sources"].items())))
    (root / "reversed.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return root


def _chosen(out: Path) -> tuple[set[tuple[str, int]], dict]:
    manifest = json.loads(out.with_name(out.stem + ".manifest.json").read_text())
    return {(s["source"], s["index"]) for s in manifest["selected"]}, manifest


@pytest.mark.parametrize("method", ["rho-loss", pytest.param("less", marks=pytest.mark.slow)])
def test_two_processes_choose_what_one_chooses(case: Path, method: str) -> None:
    one, two = case / f"{method}-1.jsonl", case / f"{method}-2.jsonl"
    args = ["select", "--config", str(case / "recipe.yaml"), "--method", method, "-n", "16"]
    single = invoke(*args, "-o", str(one), f"select.work_dir={case / ('work1-' + method)}")
    assert single.returncode == 0, single.stderr
    double = torchrun(2, *args, "-o", str(two), "--scores", str(case / f"{method}.scores.jsonl"),
                      f"select.work_dir={case / ('work2-' + method)}")
    assert double.returncode == 0, double.stderr[-4000:]
    assert "2 processes score a shard each" in double.stderr
    assert double.stdout.strip() == str(two)  # the path printed once, by the main process
    (a, manifest_one), (b, manifest_two) = _chosen(one), _chosen(two)
    assert a == b
    scores_one = {(s["source"], s["index"]): s["score"] for s in manifest_one["selected"]}
    for s in manifest_two["selected"]:
        assert s["score"] == pytest.approx(scores_one[s["source"], s["index"]], rel=1e-3, abs=1e-5)
    lines = (case / f"{method}.scores.jsonl").read_text().splitlines()
    assert len(lines) == 48  # every record scored once: the shards cover the pool without overlap


def test_less_selection_does_not_depend_on_source_order(case: Path) -> None:
    chosen = []
    for name in ("recipe", "reversed"):
        out = case / f"order-{name}.jsonl"
        result = invoke("select", "--config", str(case / f"{name}.yaml"), "--method", "less", "-n", "16", "-o",
                        str(out), f"select.work_dir={case / ('order-' + name)}")  # no shared work folder
        assert result.returncode == 0, result.stderr
        chosen.append(_chosen(out)[0])
    assert chosen[0] == chosen[1]
