"""Never lose a run: kill it, resume it, get bitwise the same result; stop cleanly at non-finite values.

The runs that are interrupted run in a subprocess (they get the signals); references and resumed runs run in this
process (conftest.invoke), which saves the imports of a fresh process each.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import invoke, run_cli, write_recipe

STEPS = ["reweight.steps=60", "reweight.log_every=5", "reweight.lisa.interval=7", "checkpoint.every=10",
         "checkpoint.keep=2"]


def start_cli(*args: str) -> subprocess.Popen:
    exe = str(Path(sys.executable).parent / "scalebio")
    return subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"finished before {path.name} appeared: {proc.stderr.read()}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def kill_at(path: Path, proc: subprocess.Popen) -> None:
    """SIGKILL `proc` (no handler runs) once `path` (a checkpoint) exists."""
    wait_for(path, proc)
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def reference(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted run with the same recipe and seed."""
    recipe = write_recipe(tmp_path_factory.mktemp("ref") / "recipe.yaml", demo)
    result = invoke("reweight", "--config", str(recipe), *STEPS)
    assert result.returncode == 0, result.stderr
    return json.loads(Path(result.stdout.strip()).read_text())


def test_sigkill_midway_then_resume_auto_is_bitwise_identical(demo: Path, tmp_path: Path, reference: dict) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    out = tmp_path / "run"
    proc = start_cli("reweight", "--config", str(recipe), *STEPS)
    kill_at(out / "checkpoints" / "step-000020", proc)
    assert not (out / "weights.json").exists()
    result = invoke("reweight", "--config", str(recipe), *STEPS, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr
    resumed = json.loads((out / "weights.json").read_text())
    assert resumed["weights"] == reference["weights"]  # bitwise: float equality of every weight
    assert resumed["weights_averaged"] == reference["weights_averaged"]
    assert resumed["trajectory"] == reference["trajectory"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 61, 5))  # no duplicated or missing log lines after the restart
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-000040", "step-000050"]  # checkpoint.keep=2, no leftovers of the killed run


def test_sigterm_checkpoints_stops_with_status_1_then_resumes(demo: Path, tmp_path: Path, reference: dict) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    out = tmp_path / "run"
    proc = start_cli("reweight", "--config", str(recipe), *STEPS)
    wait_for(out / "checkpoints" / "step-000010", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "stopped by SIGTERM after step" in stderr and "--resume auto" in stderr and "Traceback" not in stderr
    stopped_at = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    assert stopped_at > 10  # a checkpoint written on the signal, not just the periodic one
    result = invoke("reweight", "--config", str(recipe), *STEPS, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert f"step {stopped_at} of 60" in result.stderr
    assert json.loads((out / "weights.json").read_text())["weights"] == reference["weights"]


def test_finetune_sigterm_and_sigkill_then_resume_give_the_same_model(demo: Path, tmp_path: Path) -> None:
    ft = {"data": str(demo / "data" / "clean.jsonl"), "epochs": 1, "lr": 3e-3, "batch_size": 8,
          "micro_batch_size": 4, "log_every": 5, "lisa": {"layers": 2, "interval": 7}}
    args = ["checkpoint.every=10"]
    ref = write_recipe(tmp_path / "ref" / "recipe.yaml", demo, finetune=ft)
    assert invoke("finetune", "--config", str(ref), *args).returncode == 0  # the reference: no signal
    recipe = write_recipe(tmp_path / "killed" / "recipe.yaml", demo, finetune=ft)
    out = recipe.parent / "run"
    proc = start_cli("finetune", "--config", str(recipe), *args)  # 1st interruption: SIGTERM
    wait_for(out / "checkpoints" / "step-000010", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "stopped by SIGTERM" in stderr
    proc = start_cli("finetune", "--config", str(recipe), *args, "--resume", "auto")  # 2nd: SIGKILL
    kill_at(out / "checkpoints" / "step-000040", proc)
    assert not (out / "config.json").exists()  # no model folder from an interrupted run
    result = invoke("finetune", "--config", str(recipe), *args, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    a, b = load_file(str(ref.parent / "run" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_recipe_unless_forced(demo: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from scalebio_cli import cli

    def reweight(*args: str):  # in-process: the modules are loaded once, each run costs its steps only
        return CliRunner().invoke(cli.app, ["reweight", "--config", str(recipe), *args])

    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    first = reweight("reweight.steps=12", "checkpoint.every=5")
    assert first.exit_code == 0, first.output
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000010")  # pretend the run stopped at step 5
    changed = ["reweight.steps=12", "checkpoint.every=5", "reweight.alpha=3", "seed=4", "reweight.log_every=3"]
    result = reweight(*changed, "--resume", "auto")
    assert result.exit_code == 2
    assert "reweight.alpha: checkpoint 1.0, now 3.0" in result.output and "seed: checkpoint 0, now 4" in result.output
    assert "log_every" not in result.output  # logging does not change the result
    forced = reweight(*changed, "--resume", "auto", "--force")
    assert forced.exit_code == 0, forced.output
    assert "resumed from" in forced.output and "resuming despite differences" in forced.output


def test_resume_path_must_be_a_checkpoint(demo: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    result = run_cli("reweight", "--config", str(recipe), "--resume", str(tmp_path))
    assert result.returncode == 2 and "not a complete checkpoint folder" in result.stderr


def test_half_written_checkpoint_is_ignored(tmp_path: Path) -> None:
    from scalebio_cli.train import checkpoint
    from scalebio_cli.train.distributed import DistInfo

    single = DistInfo(0, 1, 0, torch.device("cpu"))
    good = checkpoint.save(tmp_path, 10, {"stage": "reweight"}, keep=3, dist=single,
                           write=lambda folder: torch.save(torch.ones(2), folder / "x.pt"))
    (tmp_path / "checkpoints" / ".step-000020.tmp").mkdir()  # a crash mid-write leaves only this
    (tmp_path / "checkpoints" / "step-000030").mkdir()  # no meta.json: incomplete
    assert checkpoint.resolve_resume(tmp_path, "auto") == good
    assert torch.equal(checkpoint.load(good, "x"), torch.ones(2))


def test_non_finite_loss_stops_with_status_1_and_keeps_the_last_good_checkpoint(demo: Path, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    from typer.testing import CliRunner

    from scalebio_cli import cli
    from scalebio_cli.train.engine import Engine

    calls = {"n": 0}
    real = Engine.__call__

    def poisoned(self, batch):  # 3 calls per step (u on B; w on B, then on V): step 13 turns NaN
        calls["n"] += 1
        sums, counts = real(self, batch)
        return (sums * float("nan"), counts) if calls["n"] > 36 else (sums, counts)

    monkeypatch.setattr(Engine, "__call__", poisoned)
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    result = CliRunner().invoke(cli.app, ["reweight", "--config", str(recipe), "reweight.steps=30",
                                          "reweight.log_every=5", "checkpoint.every=5", "checkpoint.keep=5"])
    assert result.exit_code == 1, result.output
    assert "non-finite values at step 13" in result.output and "loss_u[clean] nan" in result.output
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-000005", "step-000010"]  # nothing written after the bad step
    assert not (tmp_path / "run" / "weights.json").exists()
