"""Hostile inputs beyond the one-command catalogue of bad_inputs.py (issue 19): outputs that are inputs, resuming
after a crash, a fresh run over another, two runs at once, and the class members that need more than one command.

In-process (CliRunner on the Typer app) wherever one process suffices: modules load once, each case costs only its
own work.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bad_inputs import NO_ASSISTANT
from conftest import write_recipe
from scalebio_cli import cli
from scalebio_cli.errors import InputError
from scalebio_cli.files import file_sha256
from scalebio_cli.recipe.load import load_recipe


def invoke(*args: str | Path):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def assert_refused(result, *fragments: str) -> None:
    """Exit 2, every fragment in the message, and no traceback (an exception other than the exit is one)."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for fragment in fragments:
        assert fragment in result.output, result.output


def small_recipe(path: Path, demo: Path, **sections: object) -> Path:
    return write_recipe(path, demo, **{"reweight": {"steps": 4, "batch_size": 6, "val_batch_size": 2,
                                                    "micro_batch_size": 8, "log_every": 1,
                                                    "lisa": {"layers": 2, "interval": 2}},
                                       "checkpoint": {"every": 2, "keep": 2}, **sections})


# -- class 2: numbers that pass a naive range check ------------------------------------------------------------


@pytest.mark.parametrize("spelling", [".inf", "-.inf", "+.inf", ".Inf", ".INF", ".nan", ".NaN", ".NAN", "nan",
                                      "inf", "-Infinity", "1e999", "1.0e+999"])
def test_non_finite_floats_are_refused_in_any_spelling(tmp_path: Path, spelling: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: m\noutput_dir: out\nreweight:\n  lr_u: {spelling}\n")
    with pytest.raises(InputError, match=r"reweight.lr_u: must be a finite number"):
        load_recipe(recipe)
    recipe.write_text("model: m\noutput_dir: out\n")
    with pytest.raises(InputError, match=r"finetune.max_grad_norm: must be a finite number"):
        load_recipe(recipe, [f"finetune.max_grad_norm={spelling}"])


@pytest.mark.parametrize("override, message", [
    ("seed=-1", "seed: must be in [0, 4294967295]"),
    ("seed=4294967296", "seed: must be in [0, 4294967295]"),
    ("reweight.batch_size=1.0e+300", "reweight.batch_size: 1e+300 is too large"),
    ("checkpoint.keep=-9223372036854775809", "checkpoint.keep: -9.22e+18 is too large"),
])
def test_integers_out_of_range_for_their_consumers(tmp_path: Path, override: str, message: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\noutput_dir: out\n")
    with pytest.raises(InputError) as err:
        load_recipe(recipe, [override])
    assert any(message in p for p in err.value.problems), err.value.problems
    assert load_recipe(recipe, ["seed=4294967295"]).seed == 2**32 - 1  # the largest seed numpy takes is fine


def test_finetune_lisa_layers_beyond_the_model_is_refused_before_any_output(demo: Path, tmp_path: Path) -> None:
    recipe = small_recipe(tmp_path / "r.yaml", demo)
    result = invoke("finetune", "--config", recipe, f"finetune.data={demo}/data/clean.jsonl", "finetune.lisa.layers=5")
    assert_refused(result, f"finetune.lisa.layers: 5 is more than the 4 transformer blocks of {demo}/model")
    assert not (tmp_path / "run").exists()


# -- class 3: names that collide after YAML typing -------------------------------------------------------------


@pytest.mark.parametrize("a, b", [("1", '"1"'), ("true", '"True"'), ("Clean", "clean"), ("CLEAN", "clean"),
                                  ("caf\u00e9", "cafe\u0301"), ("\uff21", "a"), ("stra\u00dfe", "STRASSE")])
def test_source_names_that_are_one_name_are_refused(tmp_path: Path, a: str, b: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: m\noutput_dir: out\ndata:\n  sources:\n    {a}: x.jsonl\n    {b}: y.jsonl\n",
                      encoding="utf-8")
    with pytest.raises(InputError, match=r"data.sources: the names .* rename one"):
        load_recipe(recipe)


def test_named_files_on_the_command_line_are_folded_too(demo: Path, tmp_path: Path) -> None:
    clean = demo / "data" / "clean.jsonl"
    result = invoke("sample", "--weights", "uniform", "--sources", f"Clean={clean}", "--sources", f"clean={clean}",
                    "-n", "2", "-o", tmp_path / "s.jsonl")
    assert_refused(result, "--sources: the names 'Clean' (str) and 'clean' (str) differ only in case")
    result = invoke("eval", "--model", demo / "model", "--data", f"T={clean}", "--data", f"t={clean}")
    assert_refused(result, "--data: the names 'T' (str) and 't' (str)")
    assert not (tmp_path / "s.jsonl").exists()


# -- class 4: records that cannot train ------------------------------------------------------------------------


def test_a_few_chats_without_assistant_are_named_and_skipped(demo: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n" + NO_ASSISTANT + "\n")
    result = invoke("sample", "--weights", "proportional", "--sources", f"m={mixed}", "--sources",
                    f"c={demo / 'data' / 'clean.jsonl'}", "-n", "3", "-o", tmp_path / "s.jsonl")
    assert result.exit_code == 0, result.output
    assert f"--sources m: 1 of 2 records have no assistant turn and are skipped (first: {mixed}:2)" in result.output


def test_eval_of_chats_without_assistant_is_refused(demo: Path, tmp_path: Path) -> None:
    data = tmp_path / "e.json"
    data.write_text(json.dumps([json.loads(NO_ASSISTANT)] * 3))
    result = invoke("eval", "--model", demo / "model", "--data", f"e={data}", "-o", tmp_path / "r.json")
    assert_refused(result, f"{data}[0]: the conversation has no assistant turn (nor do the other 2 records)")
    assert not (tmp_path / "r.json").exists()


# -- class 5: an output that is one of the inputs --------------------------------------------------------------


@pytest.fixture()
def weights_and_sources(demo: Path, tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    from scalebio_cli.results import weights_file

    sources = {n: tmp_path / f"{n}.jsonl" for n in ("a", "b")}
    for n, p in sources.items():
        shutil.copy(demo / "data" / ("clean.jsonl" if n == "a" else "val.jsonl"), p)
    doc = weights_file.build(weights={"a": 0.5, "b": 0.5}, weights_averaged={"a": 0.5, "b": 0.5},
                             sources={n: {"path": str(p), "num_examples": 600 if n == "a" else 200,
                                          "sha256": file_sha256(p)} for n, p in sources.items()},
                             validation={"path": str(demo / "data" / "val.jsonl")}, trajectory=[], steps=1, seed=0,
                             model=str(demo / "model"), config={})
    w = tmp_path / "w.json"
    w.write_text(json.dumps(doc))
    return w, sources


@pytest.mark.parametrize("spelling", ["absolute", "relative", "dotted", "symlink", "hardlink"])
def test_sample_output_naming_a_source_is_refused(weights_and_sources, tmp_path: Path, monkeypatch,
                                                   spelling: str) -> None:
    w, sources = weights_and_sources
    target = sources["b"]
    before = file_sha256(target)
    monkeypatch.chdir(tmp_path)
    if spelling == "symlink":
        (tmp_path / "link.jsonl").symlink_to(target)
    if spelling == "hardlink":
        os.link(target, tmp_path / "hard.jsonl")
    output = {"absolute": target, "relative": Path("b.jsonl"), "dotted": Path("sub/../b.jsonl"),
              "symlink": Path("link.jsonl"), "hardlink": Path("hard.jsonl")}[spelling]
    (tmp_path / "sub").mkdir()
    result = invoke("sample", "--weights", w, "-n", "4", "-o", output)
    assert_refused(result, f"is source 'b' ({target}), an input of this command")
    assert file_sha256(target) == before
    assert not list(tmp_path.glob("*.manifest.json"))


def test_sample_output_naming_the_weights_or_validation_file_is_refused(weights_and_sources, demo: Path,
                                                                        tmp_path: Path) -> None:
    w, _ = weights_and_sources
    before = w.read_bytes()
    assert_refused(invoke("sample", "--weights", w, "-n", "4", "-o", w), "is the weights file")
    assert w.read_bytes() == before
    val = demo / "data" / "val.jsonl"
    (tmp_path / "v.jsonl").symlink_to(val)
    assert_refused(invoke("sample", "--weights", w, "-n", "4", "-o", tmp_path / "v.jsonl"), "is the validation file")
    assert_refused(invoke("sample", "--weights", w, "-n", "4", "-o", tmp_path), "is a folder")


def test_eval_output_naming_a_data_or_model_file_is_refused(demo: Path, tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "test.jsonl"
    shutil.copy(demo / "data" / "test.jsonl", data)
    before = file_sha256(data)
    monkeypatch.chdir(tmp_path)
    result = invoke("eval", "--model", demo / "model", "--data", f"t={data}", "-o", "test.jsonl")
    assert_refused(result, f"is --data t ({data}), an input of this command")
    assert file_sha256(data) == before
    config = demo / "model" / "config.json"
    config_before = config.read_bytes()
    (tmp_path / "c.json").symlink_to(config)
    result = invoke("eval", "--model", demo / "model", "--data", f"t={data}", "-o", "c.json")
    assert_refused(result, f"is config.json of the model {demo / 'model'}")
    assert config.read_bytes() == config_before


def test_finetune_output_dir_that_is_the_base_model_is_refused(demo: Path, tmp_path: Path) -> None:
    recipe = small_recipe(tmp_path / "r.yaml", demo)
    result = invoke("finetune", "--config", recipe, f"finetune.data={demo}/data/clean.jsonl",
                    f"output_dir={demo}/data/../model")
    assert_refused(result, f"output_dir: {demo}/data/../model is the model folder")


# -- class 6: degenerate evaluation ----------------------------------------------------------------------------


def test_perplexity_never_overflows_to_inf() -> None:
    from scalebio_cli.stages.evaluate import perplexity

    assert perplexity(1.0) == pytest.approx(math.e) and perplexity(800.0) is None


def test_eval_of_a_model_with_nan_weights_writes_no_results(demo: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(demo / "model", model)
    tensors = load_file(str(model / "model.safetensors"))
    tensors = {k: torch.full_like(v, float("nan")) if "norm" in k else v for k, v in tensors.items()}
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    data = tmp_path / "t.jsonl"
    data.write_text("".join((demo / "data" / "test.jsonl").read_text().splitlines(keepends=True)[:4]))
    result = invoke("eval", "--model", model, "--data", f"t={data}", "-o", tmp_path / "r.json")
    assert_refused(result, f"--model {model}: its loss on --data t is nan")
    assert not (tmp_path / "r.json").exists()


# -- class 1: damage transformers would report with a traceback ------------------------------------------------


def test_damaged_shards_and_pickles_are_named(tmp_path: Path) -> None:
    from scalebio_cli.recipe.model_folder import safetensors_problem, weights_problems

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 cut")
    problems = weights_problems(tmp_path)
    assert any("names the shard model-1.safetensors, which is missing" in p for p in problems), problems
    assert any("pytorch_model.bin is cut short or not a torch checkpoint" in p for p in problems), problems
    bad = tmp_path / "x.safetensors"
    bad.write_bytes((5).to_bytes(8, "little") + b"[1,2]")
    assert "header is not a JSON object" in safetensors_problem(bad)
    bad.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    assert "cut short or not a safetensors file" in safetensors_problem(bad)


def test_load_errors_behind_preflight_become_input_errors(demo: Path, tmp_path: Path) -> None:
    import torch

    from scalebio_cli.train.modeling import load_model, load_tokenizer

    model = tmp_path / "model"
    shutil.copytree(demo / "model", model)
    (model / "tokenizer.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    with pytest.raises(InputError, match=f"{model}: cannot load a tokenizer"):
        load_tokenizer(str(model))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))  # the tensors no longer fit
    with pytest.raises(InputError, match=f"{model}: cannot load a causal LM"):
        load_model(str(model), torch.float32, torch.device("cpu"))


# -- class 7: resuming after a crash ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step reweight run (checkpoint at step 2) on copies of the sources, so a test can change one."""
    root = tmp_path_factory.mktemp("finished")
    for name in ("clean.jsonl", "noisy.json", "offtopic.parquet"):
        shutil.copy(demo / "data" / name, root / name)
    recipe = small_recipe(root / "recipe.yaml", demo, data=_data(root, demo, ["clean", "noisy", "offtopic"]))
    result = invoke("reweight", "--config", recipe)
    assert result.exit_code == 0, result.output
    return root


SUFFIX = {"clean": ".jsonl", "noisy": ".json", "offtopic": ".parquet"}


def _data(root: Path, demo: Path, names: list[str], rename: dict[str, str] | None = None) -> dict:
    sources = {(rename or {}).get(n, n): str(root / (n.split("+")[0] + SUFFIX[n.split("+")[0]])) for n in names}
    return {"sources": sources, "validation": str(demo / "data" / "val.jsonl"), "max_length": 64}


@pytest.mark.parametrize("change, names, rename, message", [
    ("reordered", ["noisy", "clean", "offtopic"], None, "data.sources: reordered (checkpoint clean, noisy, offtopic;"),
    ("renamed", ["clean", "noisy", "offtopic"], {"clean": "tidy"}, "data.sources: checkpoint {'clean'"),
    ("added", ["clean", "noisy", "offtopic", "clean+"], {"clean+": "again"}, "'again'"),
    ("removed", ["clean", "noisy"], None, "data.sources: checkpoint"),
])
def test_resume_refuses_changed_sources(finished_run: Path, demo: Path, change: str, names: list[str],
                                        rename: dict | None, message: str) -> None:
    recipe = small_recipe(finished_run / f"{change}.yaml", demo, data=_data(finished_run, demo, names, rename),
                          output_dir=str(finished_run / "run"))
    result = invoke("reweight", "--config", recipe, "--resume", "auto")
    assert_refused(result, "the recipe differs from the checkpoint's in keys that change the result", message)


def test_resume_refuses_a_source_changed_in_content(finished_run: Path, demo: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)
    data = _data(finished_run, demo, ["clean", "noisy", "offtopic"])
    changed = tmp_path / "clean.jsonl"
    shutil.copy(finished_run / "clean.jsonl", changed)
    with changed.open("a") as f:
        f.write(json.dumps({"prompt": "What is 1 + 1?", "completion": "2"}) + "\n")
    data["sources"]["clean"] = str(changed)
    meta = run / "checkpoints" / "step-000002" / "meta.json"  # the checkpoint knew the file by this path
    info = json.loads(meta.read_text())
    info["config"]["data"]["sources"]["clean"] = str(changed)
    meta.write_text(json.dumps(info))
    recipe = small_recipe(tmp_path / "r.yaml", demo, data=data, output_dir=str(run))
    result = invoke("reweight", "--config", recipe, "--resume", "auto")
    assert_refused(result, "clean: the data file changed since the checkpoint (sha256)")


def test_resume_drops_a_torn_metrics_line_and_goes_on(finished_run: Path, demo: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])  # killed mid-write of step 4's line
    for result in ("weights.json", "weights.png", "finished.json"):  # ... so the run never finished
        (run / result).unlink(missing_ok=True)
    recipe = small_recipe(tmp_path / "r.yaml", demo, data=_data(finished_run, demo, ["clean", "noisy", "offtopic"]),
                          output_dir=str(run))
    result = invoke("reweight", "--config", recipe, "--resume", "auto")
    assert result.exit_code == 0, result.output
    assert "dropped 1 unreadable line(s) (4)" in result.output and "resumed from" in result.output
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_damaged_checkpoint_file_is_named(finished_run: Path, tmp_path: Path) -> None:
    from scalebio_cli.train import checkpoint

    ckpt = tmp_path / "step-000002"
    shutil.copytree(finished_run / "run" / "checkpoints" / "step-000002", ckpt)
    trainer = ckpt / "trainer.pt"
    trainer.write_bytes(trainer.read_bytes()[:100])
    with pytest.raises(InputError, match=r"trainer.pt: damaged checkpoint file"):
        checkpoint.load(ckpt, "trainer")
    (ckpt / "meta.json").write_text('{"step": 2, "con')
    with pytest.raises(InputError, match=r"meta.json: damaged checkpoint metadata"):
        checkpoint.meta(ckpt)


# -- class 9: a fresh run over another run ---------------------------------------------------------------------


def test_a_fresh_run_over_another_runs_checkpoints_is_refused(finished_run: Path, demo: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)
    recipe = small_recipe(tmp_path / "r.yaml", demo, output_dir=str(run))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = invoke("reweight", "--config", recipe)
    # that run read copies of the sources: a run of another recipe, named as such with the keys that differ
    assert_refused(result, f"output_dir {run} already holds a reweight run of another recipe (finished; reweight "
                   "checkpoints up to step 2, weights.json; data.sources: there", "--force")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    result = invoke("finetune", "--config", recipe, f"finetune.data={demo}/data/clean.jsonl")
    assert_refused(result, f"output_dir {run}: holds a reweight run", "a finetune run there would mix its",
                   "--force clears only checkpoints, never another stage's results", "choose another output_dir")
    shutil.rmtree(run / "checkpoints")  # weights.json alone: nothing to resume, still another run's result
    result = invoke("reweight", "--config", recipe, "--resume", "auto")
    assert_refused(result, "already holds a reweight run of another recipe (finished; weights.json;")
    assert "--resume auto" not in result.output.split("mix with it")[1]


def test_force_starts_over_without_mixing_checkpoints(finished_run: Path, demo: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)
    (run / "checkpoints" / "step-000050").mkdir()  # a longer old run: would outlive the new one's under `keep`
    shutil.copy(run / "checkpoints" / "step-000002" / "meta.json", run / "checkpoints" / "step-000050")
    recipe = small_recipe(tmp_path / "r.yaml", demo, output_dir=str(run), checkpoint={"every": 1, "keep": 2})
    result = invoke("reweight", "--config", recipe, "reweight.steps=3", "--force")
    assert result.exit_code == 0, result.output
    assert "starting over (--force)" in result.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


# -- class 10: two runs into one folder at once ----------------------------------------------------------------

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b'{"pid": %d, "host": "h", "command": "scalebio reweight", "started": "now"}' % os.getpid())
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture()
def holder():
    """Another process holding a lock file (what a running scalebio does), killed at the end."""
    procs = []

    def hold(lock: Path) -> subprocess.Popen:
        lock.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_run_into_a_held_folder_is_refused_at_once(demo: Path, tmp_path: Path, holder) -> None:
    recipe = small_recipe(tmp_path / "r.yaml", demo)
    proc = holder(tmp_path / "run" / ".scalebio.lock")
    for args in (["reweight", "--config", recipe],
                 ["finetune", "--config", recipe, f"finetune.data={demo}/data/clean.jsonl"]):
        start = time.perf_counter()
        result = invoke(*args)
        assert_refused(result, f"{tmp_path / 'run'}: another scalebio run is writing here (pid {proc.pid}")
        assert time.perf_counter() - start < 10  # refused up front, before any model or data work
    assert (tmp_path / "run" / ".scalebio.lock").exists()  # the holder's lock is left alone


def test_a_second_sample_into_the_same_output_is_refused(weights_and_sources, tmp_path: Path, holder) -> None:
    w, _ = weights_and_sources
    out = tmp_path / "out" / "s.jsonl"
    holder(out.parent / ".s.jsonl.scalebio.lock")
    assert_refused(invoke("sample", "--weights", w, "-n", "4", "-o", out), "another scalebio run is writing here")
    assert not out.exists()
    other = invoke("sample", "--weights", w, "-n", "4", "-o", out.parent / "t.jsonl")  # another file: free
    assert other.exit_code == 0, other.output


def test_a_stale_lock_of_a_dead_process_is_taken_over(demo: Path, tmp_path: Path) -> None:
    from scalebio_cli.results import run_folder

    lock = tmp_path / "run" / ".scalebio.lock"
    lock.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.kill()  # SIGKILL: no cleanup ran, the lock file stays
    proc.wait()
    assert lock.exists()
    with run_folder.claim(tmp_path / "run", "reweight", None, False):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_only_rank_0_takes_the_lock(tmp_path: Path, holder, monkeypatch) -> None:
    from scalebio_cli.results import run_folder

    holder(tmp_path / "run" / ".scalebio.lock")
    monkeypatch.setenv("RANK", "1")
    with run_folder.claim(tmp_path / "run", "reweight", None, False):
        pass  # rank 1 is one of the holder's processes: it must not refuse itself
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(InputError, match="another scalebio run is writing here"):
        run_folder.claim(tmp_path / "run", "reweight", None, False).__enter__()


def test_two_real_runs_the_second_is_refused_and_the_lock_dies_with_the_first(demo: Path, tmp_path: Path) -> None:
    recipe = small_recipe(tmp_path / "r.yaml", demo, reweight={"steps": 5000, "batch_size": 6, "val_batch_size": 2,
                                                               "log_every": 1})
    exe = str(Path(sys.executable).parent / "scalebio")
    first = subprocess.Popen([exe, "reweight", "--config", str(recipe)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists():  # running, not just started
            assert first.poll() is None and time.time() < deadline, first.stderr.read()
            time.sleep(0.05)
        assert_refused(invoke("reweight", "--config", recipe), "another scalebio run is writing here",
                       f"pid {first.pid}")
    finally:
        first.kill()
        first.wait()
    from scalebio_cli.results import run_folder

    with run_folder.locked(tmp_path / "run" / ".scalebio.lock", "test"):
        pass  # the kernel released the dead run's lock


def test_a_refused_run_leaves_no_folder_behind(demo: Path, tmp_path: Path) -> None:
    """The lock needs its folder; bad input found after it was taken must still leave nothing."""
    recipe = small_recipe(tmp_path / "r.yaml", demo, output_dir=str(tmp_path / "a" / "b" / "run"))
    result = invoke("reweight", "--config", recipe, "data.max_length=8")  # refused after tokenization
    assert_refused(result, "keeps a response token within data.max_length=8")
    assert not (tmp_path / "a").exists()


def test_recipe_yaml_of_a_run_still_loads(finished_run: Path) -> None:
    """Resuming from the run's own recipe.yaml (in the output folder) must not count as clobbering an input."""
    saved = finished_run / "run" / "recipe.yaml"
    assert load_recipe(saved).output_dir == str(finished_run / "run")
    assert yaml.safe_load(saved.read_text())["reweight"]["steps"] == 4


# -- class 8 (beyond the catalogue) and the class table --------------------------------------------------------


def test_allow_changed_sources_stays_the_escape(weights_and_sources, tmp_path: Path) -> None:
    w, _ = weights_and_sources
    doc = json.loads(w.read_text())
    doc["sources"]["a"]["num_examples"] = 7  # edited: refused, then sampled anyway when asked to
    w.write_text(json.dumps(doc))
    assert_refused(invoke("sample", "--weights", w, "-n", "4", "-o", tmp_path / "s.jsonl"),
                   "sources.a.num_examples is 7 but")
    result = invoke("sample", "--weights", w, "-n", "4", "-o", tmp_path / "s.jsonl", "--allow-changed-sources")
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 4


def test_every_class_has_two_tested_members_that_exist() -> None:
    import ast

    from bad_inputs import CASES, HOSTILE

    ids = {c.id for c in CASES}
    for cls in HOSTILE:
        assert len(cls.cases) + len(cls.tests) >= 2, cls.name
        assert set(cls.cases) <= ids, cls.name
        for ref in cls.tests:
            module, name = ref.split("::")
            tree = ast.parse((Path(__file__).parent / f"{module}.py").read_text())
            assert name in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, ref
