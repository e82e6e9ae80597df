"""SmolLM2-135M-Instruct, the real pretrained model (scripts/get_smollm2.py): the GGUF file and its converted folder
learn the same weights. Slow (two short reweights of a 135M model on CPU): `make test-slow`. Skipped, saying why,
where the package cannot be installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, Path]:
    script = [sys.executable, str(ROOT / "scripts" / "get_smollm2.py")]
    gguf = subprocess.run([*script, "--gguf"], capture_output=True, text=True)
    if gguf.returncode != 0:
        pytest.skip(f"SmolLM2 unavailable: {gguf.stderr.strip()}")
    folder = subprocess.run(script, capture_output=True, text=True, check=True)
    return Path(gguf.stdout.strip().splitlines()[-1]), Path(folder.stdout.strip().splitlines()[-1])


def test_gguf_file_and_converted_folder_give_the_same_weights(smollm2, demo: Path, tmp_path: Path) -> None:
    import yaml

    weights = {}
    for kind, model in zip(("gguf", "folder"), smollm2):
        recipe = {"model": str(model), "output_dir": str(tmp_path / kind), "seed": 0,
                  "data": {"sources": {"clean": str(demo / "data" / "clean.jsonl"),
                                       "noisy": str(demo / "data" / "noisy.json")},
                           "validation": str(demo / "data" / "val.jsonl"), "max_length": 48},
                  "reweight": {"steps": 3, "batch_size": 4, "val_batch_size": 2, "micro_batch_size": 6,
                               "log_every": 1, "lr_lambda": 0.1, "lisa": {"layers": 2, "interval": 2}}}
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        result = run_cli("reweight", "--config", str(path), timeout=1800)
        assert result.returncode == 0, result.stderr[-3000:]
        weights[kind] = json.loads((tmp_path / kind / "weights.json").read_text())["weights"]
    assert weights["gguf"].keys() == weights["folder"].keys()
    assert max(abs(weights["gguf"][k] - weights["folder"][k]) for k in weights["gguf"]) < 1e-5
    assert weights["gguf"]["clean"] != 0.5  # the weights moved
