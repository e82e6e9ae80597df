"""A user's first hour (issue #32): what a run costs as it goes, honest resume, and errors that say the fix."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import invoke, write_recipe

SHORT = ["reweight.steps=8", "reweight.log_every=5", "checkpoint.every=4"]


# -- cost and progress -------------------------------------------------------------------------------------------


def test_throughput_says_seconds_per_step_and_eta(monkeypatch) -> None:
    from scalebio_cli.train import loop

    clock = iter([100.0, 103.0])  # then 106 for ever
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock, 106.0))
    pace = loop.Throughput(start=0, total=100, unit="train tok/s (u+w)")  # t=100
    assert pace.pace() == "" and pace.sec_per_step() is None
    pace.step(1)  # t=103: the first step (warm-up) is left out once a second is timed
    pace.add(1000)
    pace.step(2)
    pace.step(3)
    assert pace.early(3, log_every=20) and not pace.early(3, log_every=2) and not pace.early(4, log_every=20)
    assert pace.sec_per_step() == pytest.approx(1.5)  # at t=106: (106 - 103) / 2
    assert pace.pace() == "1.50 s/step · ETA 2m26s"  # 97 steps left
    assert "train tok/s (u+w)" in pace.first_steps(500.0) and "steps 1-100" in pace.first_steps(500.0)
    assert [loop.format_duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


@pytest.fixture(scope="module")
def short_run(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An 8-step reweight (checkpoint at step 4, log lines at 5 and 8): its recipe and its stderr."""
    recipe = write_recipe(tmp_path_factory.mktemp("first-hour") / "recipe.yaml", demo)
    result = invoke("reweight", "--config", recipe, *SHORT)
    assert result.returncode == 0, result.stderr
    return recipe, result.stderr


def test_the_log_says_what_a_run_costs_from_step_3(short_run) -> None:
    recipe, stderr = short_run
    early = next(line for line in stderr.splitlines() if line.startswith("first 3 steps:"))
    assert " s/step · ETA " in early and "for steps 1-8" in early and "train tok/s (u+w)" in early
    step5 = next(line for line in stderr.splitlines() if line.startswith("step     5/8"))
    assert "train tok/s (u+w)" in step5 and " s/step · ETA " in step5
    lines = [json.loads(line) for line in (recipe.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["sec_per_step"] > 0 and r["tokens_per_s"] > 0 for r in lines)
    # the checkpoint of step 4 says its size, and what checkpoint.keep of them take
    saved = re.search(r"checkpoint step 4: \S+step-000004 \(([\d.]+) ([KMG]B); checkpoint.keep=2: up to [\d.]+ [KMG]B",
                      stderr)
    assert saved, stderr
    size = sum(f.stat().st_size for f in (recipe.parent / "run" / "checkpoints" / "step-000004").rglob("*"))
    assert float(saved[1]) * {"KB": 1e3, "MB": 1e6, "GB": 1e9}[saved[2]] == pytest.approx(size, rel=0.06)


# -- honest resume -----------------------------------------------------------------------------------------------


def test_resume_auto_on_a_finished_run_recomputes_nothing(short_run) -> None:
    recipe, _ = short_run
    out = recipe.parent / "run"
    weights = out / "weights.json"
    assert json.loads((out / "finished.json").read_text())["result"] == "weights.json"  # the folder may move
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    result = invoke("reweight", "--config", recipe, *SHORT, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - start < 5
    assert result.stdout.strip() == str(weights)  # the result path on stdout, as a normal run prints it
    assert f"already complete: {weights}" in result.stderr and "resumed from" not in result.stderr
    assert weights.stat().st_mtime_ns == before


def test_refusals_tell_this_run_finished_interrupted_and_another_recipe(short_run, tmp_path: Path) -> None:
    import shutil

    recipe, _ = short_run
    run = tmp_path / "run"
    shutil.copytree(recipe.parent / "run", run)
    args = ["reweight", "--config", recipe, *SHORT, f"output_dir={run}"]
    result = invoke(*args)
    assert result.returncode == 2
    assert f"already holds this run, finished ({run / 'weights.json'})" in result.stderr
    assert "`--resume auto` prints its result" in result.stderr
    other = invoke(*args, "reweight.alpha=3")
    assert other.returncode == 2
    assert "already holds a reweight run of another recipe (finished" in other.stderr
    assert "reweight.alpha: there 1.0, now 3.0" in other.stderr and "another run" not in other.stderr
    (run / "weights.json").unlink()  # as if stopped after the checkpoint of step 4
    (run / "finished.json").unlink()
    result = invoke(*args)
    assert result.returncode == 2
    assert "already holds this run, interrupted at step 4 (resume with --resume auto)" in result.stderr


def test_sigint_checkpoints_and_exits_130(demo: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    out = tmp_path / "run"
    exe = str(Path(sys.executable).parent / "scalebio")
    proc = subprocess.Popen([exe, "reweight", "--config", str(recipe), "reweight.steps=60", "checkpoint.every=5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-000005").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGINT after step" in stderr and "--resume auto" in stderr and "Traceback" not in stderr
    # said at once, before the step in progress ends (then the checkpoint, then the exit)
    heard = stderr.index("SIGINT received: stopping after this step")
    assert heard < stderr.index("stopped by SIGINT after step") and "Ctrl-C again stops at once" in stderr
    assert stdout == "" and not (out / "weights.json").exists() and not (out / "finished.json").exists()
    assert max(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir()) > 5  # saved on the signal


# -- errors that say the fix -------------------------------------------------------------------------------------


def test_an_unreachable_hub_model_fails_at_once(demo: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", demo, model="someorg/some-model")
    start = time.perf_counter()
    result = invoke("reweight", "--config", recipe)  # conftest sets HF_HUB_OFFLINE=1
    assert time.perf_counter() - start < 5
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""
    assert "model: 'someorg/some-model' is not a local path, so it names a Hub model" in result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr and "local model folder or a .gguf file" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, hint", [
    (["--steps", "5"], "No such option --steps; did you mean reweight.steps=5 ?"),
    (["--lr_u=1e-4"], "No such option --lr_u; did you mean reweight.lr_u=1e-4 ?"),
    (["--output-dir", "/tmp/x"], "No such option --output-dir; did you mean output_dir=/tmp/x ?"),
])
def test_a_flag_that_is_a_recipe_key_gets_the_key_value_spelling(tmp_path: Path, args: list[str],
                                                                   hint: str) -> None:
    result = invoke("reweight", "--config", tmp_path / "r.yaml", *args)
    assert result.returncode == 2 and hint in result.stderr


def test_a_flag_that_is_no_recipe_key_keeps_clicks_message(tmp_path: Path) -> None:
    result = invoke("reweight", "--config", tmp_path / "r.yaml", "--bogus")
    assert result.returncode == 2 and "No such option: --bogus" in result.stderr


def test_file_not_found_suggests_nearby_names(demo: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    result = invoke("reweight", "--config", tmp_path / "recipe.yml")
    assert result.returncode == 2 and f"recipe file not found (did you mean {recipe}?)" in result.stderr
    result = invoke("reweight", "--config", recipe, f"data.sources.clean={demo}/data/clena.jsonl")
    assert result.returncode == 2
    assert f"file not found: {demo}/data/clena.jsonl (did you mean {demo}/data/clean.jsonl?)" in result.stderr
    result = invoke("sample", "--weights", tmp_path / "wieghts.json", "-n", "3", "-o", tmp_path / "s.jsonl")
    (tmp_path / "weights.json").write_text("{}")
    result = invoke("sample", "--weights", tmp_path / "wieghts.json", "-n", "3", "-o", tmp_path / "s.jsonl")
    assert result.returncode == 2
    assert f"weights file not found (did you mean {tmp_path / 'weights.json'}?)" in result.stderr


def test_json_errors_say_at_once() -> None:
    from scalebio_cli.data.read.records import parse_jsonl_line
    from scalebio_cli.errors import InputError

    for line, expected in [('{"a": "x', "Unterminated string starting at column 7"),
                           ('{"a": "\x01"}', "Invalid control character at column 8"),
                           ('{"a" 1}', "Expecting ':' delimiter at column 6")]:
        with pytest.raises(InputError) as exc:
            parse_jsonl_line("f.jsonl", 3, line)
        assert str(exc.value) == f"f.jsonl:3: not valid JSON ({expected})"
        assert "at at" not in str(exc.value)


# -- small things a new user trips over (issue #43) ------------------------------------------------------------


def test_help_is_readable_at_80_columns() -> None:
    """Every command's --help at COLUMNS=80: no line wider than 80, every option name written out in full (rich's
    option tables cut them: `--no-replaceme…`)."""
    import typer.main
    from typer.testing import CliRunner

    from scalebio_cli import cli

    group = typer.main.get_command(cli.app)
    for name, command in [("", group), *group.commands.items()]:
        result = CliRunner().invoke(cli.app, [*([name] if name else []), "--help"], env={"COLUMNS": "80"},
                                    terminal_width=80)
        assert result.exit_code == 0, result.output
        assert "…" not in result.output, f"scalebio {name} --help cuts text at 80 columns"
        assert max(len(line) for line in result.output.splitlines()) <= 80, f"scalebio {name} --help"
        for param in command.params:
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("-"):
                    assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", result.output), (name, opt)


def test_a_run_folder_given_as_weights_names_its_weights_json(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    args = ["-n", "3", "-o", tmp_path / "s.jsonl"]
    result = invoke("sample", "--weights", run, *args)
    assert result.returncode == 2 and "weights.json" in result.stderr and "did you mean" not in result.stderr
    assert "a folder, not a weights file" in result.stderr and not (tmp_path / "s.jsonl").exists()
    (run / "weights.json").write_text("{}")
    result = invoke("sample", "--weights", run, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{run}: a run folder, not a weights file: did you mean {run / 'weights.json'}?" in result.stderr


# -- long work speaks (issue #43) ---------------------------------------------------------------------------------


def test_the_bar_and_the_log_give_one_eta(monkeypatch) -> None:
    """The progress bar's time left comes from the estimate the log lines print (Throughput), not rich's own."""
    from scalebio_cli import console as con
    from scalebio_cli.train import loop

    clock = iter([100.0, 103.0])  # then 106 for ever
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock, 106.0))
    pace = loop.Throughput(start=0, total=100)
    progress = con.step_progress("reweight", enabled=False)
    task_id = progress.add_task("reweight", total=100, info="", pace=pace.sec_per_step)
    for done in (1, 2, 3):
        pace.step(done)
        progress.advance(task_id)
    task = progress.tasks[0]
    column = next(c for c in progress.columns if isinstance(c, con.EtaColumn))
    assert column.render(task).plain == "2m26s" == con.format_duration(pace.eta())
    assert pace.pace().endswith("ETA 2m26s")
    progress.update(task_id, pace=None)  # a bar without a pace: rich's estimate, in the same format
    assert re.fullmatch(r"-|\d+s|\d+m\d\ds|\d+h\d\dm", column.render(progress.tasks[0]).plain)


def test_a_signal_is_acknowledged_at_once(capsys) -> None:
    import os

    from scalebio_cli.train.stopping import StopSignals

    signals = StopSignals()
    with signals.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs at the next bytecode; the loop would still be inside its step
        assert signals.received == "SIGTERM"
        assert "SIGTERM received: stopping after this step (a checkpoint is written first" in capsys.readouterr().err


def test_a_heartbeat_when_output_is_not_a_terminal(monkeypatch, capsys) -> None:
    """select, compare and group (and every loop with a progress bar) say where they are every ~30 s when their
    output goes to a file, where no bar is drawn; and nothing while the log speaks by itself."""
    from scalebio_cli import console as con

    monkeypatch.setattr(con, "HEARTBEAT_SECONDS", 0.05)
    assert not con.console.is_terminal  # captured: what a log file or CI gets
    with con.step_progress("score") as progress:
        task = progress.add_task("score", total=1000, info="pool 2 of 5")
        for _ in range(5):  # rich's own estimate (no `pace` here) needs a few updates
            progress.advance(task, 50)
            time.sleep(0.08)
    err = capsys.readouterr().err
    assert re.search(r"score 250/1,000 · \d+s elapsed · ETA \d+s · pool 2 of 5", err), err
    with con.heartbeat("LESS: projecting gradients"):
        time.sleep(0.4)
    assert "LESS: projecting gradients: still working (0s)" in capsys.readouterr().err
    with con.heartbeat("quiet"):
        for _ in range(8):
            con.console.print("the log speaks")
            time.sleep(0.02)
    assert "still working" not in capsys.readouterr().err
