"""Shared fixtures: a tiny Llama and demo data built once per session, offline, on CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Before anything imports transformers/deepspeed: offline, CPU, and a private tokenization cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="scalebio-test-datasets-")  # never ~/.cache
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["SCALEBIO_CACHE"] = tempfile.mkdtemp(prefix="scalebio-test-cache-")

ROOT = Path(__file__).resolve().parent.parent
# DeepSpeed's CPU Adam is compiled on a machine's first use (~1 min): one folder for every test, in-process or not,
# so the suite compiles it once
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
# Where tests find the real model's folder (scripts/get_smollm2.py) and the real data; tests that need them skip
# when they are absent.
SMOLLM2 = Path.home() / ".cache" / "scalebio" / "models" / "SmolLM2-135M-Instruct"
INSTRUCT_MATH = ROOT.parent / "shared" / "data" / "instruct-math"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run where CUDA is available and are skipped, saying why, everywhere else."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo folder like `make demo` builds: data/ (three sources, val, test) and model/ (4-block Llama)."""
    from scalebio_cli.tiny import corpus_texts, make_demo_data, save_tiny_model

    root = tmp_path_factory.mktemp("demo")
    paths = make_demo_data(root / "data")
    save_tiny_model(root / "model", corpus_texts(list(paths.values())), arch="llama", layers=4, hidden=64)
    return root


@pytest.fixture(scope="session")
def layouts(demo: Path) -> dict[str, Path]:
    """The demo data as users keep it (scalebio_cli.tiny_layouts): Hub repository folders, save_to_disk, csv, ..."""
    from scalebio_cli.tiny_layouts import build_layouts

    return build_layouts(demo / "layouts", demo / "data")


@pytest.fixture(scope="session")
def tokenizer(demo: Path):
    from scalebio_cli.train.modeling import load_tokenizer

    return load_tokenizer(str(demo / "model"))


def write_recipe(path: Path, demo: Path, **sections: object) -> Path:
    """A demo recipe at `path` (YAML), with top-level keys/sections replaced by `sections`."""
    import yaml

    recipe = {
        "model": str(demo / "model"),
        "output_dir": str(path.parent / "run"),
        "seed": 0,
        "data": {
            "sources": {
                "clean": str(demo / "data" / "clean.jsonl"),
                "noisy": str(demo / "data" / "noisy.json"),
                "offtopic": str(demo / "data" / "offtopic.parquet"),
            },
            "validation": str(demo / "data" / "val.jsonl"),
            "max_length": 64,
        },
        "reweight": {"steps": 200, "alpha": 1, "lr_u": 3e-3, "lr_w": 3e-3, "lr_lambda": 2e-2,
                     "lambda_schedule": "cosine", "lambda_delay": 0, "batch_size": 24,
                     "val_batch_size": 8, "micro_batch_size": 32, "log_every": 20,
                     "lisa": {"layers": 2, "interval": 20}},
    }
    recipe.update(sections)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def reweighted(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short reweight of the demo (20 steps, TensorBoard on), shared by the export, tracking and report tests:
    its output folder (weights.json, metrics.jsonl, recipe.yaml, tensorboard/)."""
    root = tmp_path_factory.mktemp("reweighted")
    recipe = write_recipe(root / "recipe.yaml", demo, report_to=["tensorboard"])
    result = invoke("reweight", "--config", str(recipe), "reweight.steps=20", "reweight.log_every=5")
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip()).parent


def write_demo_weights(path: Path, demo: Path, weights: dict[str, float]) -> Path:
    """A weights file over demo sources (`clean`, `noisy`, ...) with these weights, as `reweight` would write it."""
    from scalebio_cli.files import file_sha256
    from scalebio_cli.results import weights_file

    files = {"clean": "clean.jsonl", "noisy": "noisy.json", "offtopic": "offtopic.parquet"}
    sources = {n: {"path": str(demo / "data" / files[n]), "num_examples": 600,
                   "sha256": file_sha256(demo / "data" / files[n])} for n in weights}
    weights_file.write(path, weights_file.build(weights=weights, weights_averaged=weights, sources=sources,
                                                validation=None, trajectory=[], steps=1, seed=0, model="m", config={}))
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real `scalebio` console entry point in a subprocess."""
    exe = shutil.which("scalebio", path=str(Path(sys.executable).parent)) or "scalebio"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "COLUMNS": "80"})  # what CI logs get: messages must not wrap


def invoke(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI in this process (Typer's CliRunner), with run_cli's result shape. A command that needs torch
    and transformers costs its work only, not the ~5 s of importing them in a fresh process: for tests where one
    process suffices (no signals, no torchrun, no per-process environment). An exception the CLI does not turn
    into an exit status comes back as status 1 with its traceback on stderr, as a subprocess would show it."""
    import traceback

    from typer.testing import CliRunner

    from scalebio_cli import cli

    result = CliRunner().invoke(cli.app, [str(a) for a in args], env={"COLUMNS": "80"})
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["scalebio", *args], result.exit_code, result.stdout, stderr)
