"""Several processes on one CPU (gloo): DDP under torchrun and DeepSpeed ZeRO-2/3 reduce exactly.

A 2-process run must give the same weights as a 1-process run with the same global batch and seed (it can only
if per-source sums and counts are reduced before dividing), LISA-frozen blocks must not move under any engine,
and a model fine-tuned with several processes must load in `scalebio eval`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli, write_recipe
from scalebio_cli.train.lisa import draw_blocks

pytest.importorskip("deepspeed")

SHORT = ["reweight.steps=12", "reweight.log_every=4", "reweight.lisa.interval=5"]  # 3 LISA draws
ZERO = {2: str(ROOT / "recipes" / "deepspeed" / "zero2.json"), 3: str(ROOT / "recipes" / "deepspeed" / "zero3.json")}


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "scalebio")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), exe, *args], capture_output=True, text=True, env=env, timeout=600)


def weights_of(result: subprocess.CompletedProcess[str], out: Path) -> dict[str, float]:
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "weights.json").read_text())["weights"]


@pytest.fixture(scope="module")
def single_process_weights(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    recipe = write_recipe(tmp_path_factory.mktemp("one") / "recipe.yaml", demo)
    return weights_of(run_cli("reweight", "--config", str(recipe), *SHORT), recipe.parent / "run")


def test_ddp_two_processes_match_one(demo: Path, tmp_path: Path, single_process_weights) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    result = torchrun(2, "reweight", "--config", str(recipe), *SHORT)
    two = weights_of(result, tmp_path / "run")
    assert "DDP x 2" in result.stderr
    assert result.stdout.count("weights.json") == 1  # only rank 0 prints the result
    assert max(abs(two[k] - single_process_weights[k]) for k in two) < 1e-4


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes_match_one(demo: Path, tmp_path: Path, stage: int) -> None:
    got = {}
    for nproc in (1, 2):
        recipe = write_recipe(tmp_path / str(nproc) / "recipe.yaml", demo, deepspeed=ZERO[stage])
        result = torchrun(nproc, "reweight", "--config", str(recipe), *SHORT)
        got[nproc] = weights_of(result, recipe.parent / "run")
        assert f"DeepSpeed x {nproc}" in result.stderr
    assert max(abs(got[2][k] - got[1][k]) for k in got[1]) < 1e-4


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3"])
def test_lisa_frozen_blocks_stay_put_and_the_model_loads(engine: str, demo: Path, tmp_path: Path) -> None:
    """Two-process LISA fine-tune with one draw: exactly the drawn block (and head, norm) moves; eval loads it."""
    ft = {"data": str(demo / "data" / "clean.jsonl"), "epochs": 0.1, "lr": 3e-3, "batch_size": 8,
          "micro_batch_size": 2, "lisa": {"layers": 1, "interval": 1000}}
    extra = {"deepspeed": ZERO[int(engine[-1])]} if engine != "ddp" else {}
    recipe = write_recipe(tmp_path / "recipe.yaml", demo, finetune=ft, **extra)
    result = torchrun(2, "finetune", "--config", str(recipe))
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "run"
    before, after = load_file(str(demo / "model" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    active = draw_blocks(4, 1, seed=0, draw=0)
    for i in range(4):
        block = [k for k in before if k.startswith(f"model.layers.{i}.")]
        moved = [k for k in block if not torch.equal(before[k], after[k])]
        assert (moved == block) if i in active else (moved == []), f"{engine}: block {i}, active {active}"
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    evaluated = run_cli("eval", "--model", str(out), "--data", f"test={demo / 'data' / 'test.jsonl'}",
                        "-o", str(tmp_path / "r.json"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "r.json").read_text())["results"]["test"]["num_examples"] == 200
