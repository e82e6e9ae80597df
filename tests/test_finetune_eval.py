"""`scalebio finetune` and `scalebio eval`, and the whole pipeline on the demo data."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, invoke, run_cli, write_demo_weights, write_recipe
from scalebio_cli.data.out.answers import extract_answer, math_verify_equal
from scalebio_cli.train.lisa import draw_blocks

FT = {"epochs": 1, "lr": 3e-3, "batch_size": 16, "micro_batch_size": 8, "log_every": 5, "eval_every": 10}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def finetune(tmp_path: Path, demo: Path, **finetune_keys) -> tuple[subprocess.CompletedProcess, Path]:
    data = demo / "data" / "clean.jsonl"
    recipe = write_recipe(tmp_path / "recipe.yaml", demo,
                          finetune={**FT, "data": str(data), "validation": str(demo / "data" / "val.jsonl"),
                                    **finetune_keys})
    result = invoke("finetune", "--config", str(recipe), "finetune.epochs=0.16")  # 6 steps of 16 of 600
    return result, recipe.parent / "run"


@pytest.fixture(scope="module")
def finetuned(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """A full-parameter fine-tune of the demo model on the clean source (6 steps)."""
    result, out = finetune(tmp_path_factory.mktemp("ft"), demo)
    assert result.returncode == 0, result.stderr
    return result, out


def test_full_finetune_changes_every_parameter_and_saves_a_loadable_folder(finetuned, demo: Path) -> None:
    result, out = finetuned
    assert result.stdout.strip() == str(out)
    before, after = tensors(demo / "model"), tensors(out)
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).exists()
    assert not any(p.name.startswith(".model-tmp") for p in out.iterdir())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [5, 6]
    val = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in val] == [0, 6] and val[-1]["val_loss"] < val[0]["val_loss"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # a standard Hugging Face folder


def test_lisa_finetune_leaves_frozen_blocks_untouched(demo: Path, tmp_path: Path) -> None:
    result, out = finetune(tmp_path, demo, lisa={"layers": 1, "interval": 100})  # one draw for all 6 steps
    assert result.returncode == 0, result.stderr
    active = draw_blocks(4, 1, seed=0, draw=0)
    before, after = tensors(demo / "model"), tensors(out)
    for i in range(4):
        block = [k for k in before if k.startswith(f"model.layers.{i}.")]
        moved = [k for k in block if not torch.equal(before[k], after[k])]
        assert (moved == block) if i in active else (moved == []), f"block {i}, active {active}"
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def test_finetune_mixes_sources_by_a_weights_file(demo: Path, tmp_path: Path) -> None:
    names = {"clean": demo / "data" / "clean.jsonl", "noisy": demo / "data" / "noisy.json"}
    w = write_demo_weights(tmp_path / "weights.json", demo, {"clean": 0.9, "noisy": 0.1})
    recipe = write_recipe(tmp_path / "recipe.yaml", demo, finetune={**FT, "weights": str(w)},
                          data={"sources": {n: str(p) for n, p in names.items()}, "max_length": 64})
    result = invoke("finetune", "--config", str(recipe), "finetune.epochs=0.05")
    assert result.returncode == 0, result.stderr
    assert "mixed by" in result.stderr and "clean 0.900" in result.stderr


def test_finetune_needs_exactly_one_data_choice(demo: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", demo, finetune=FT)
    result = run_cli("finetune", "--config", str(recipe))
    assert result.returncode == 2 and "set exactly one of finetune.data" in result.stderr


def test_eval_reports_loss_perplexity_and_accuracy(finetuned, demo: Path, tmp_path: Path) -> None:
    finetuned = finetuned[1]
    out = tmp_path / "result.json"
    result = invoke("eval", "--model", str(finetuned), "--data", f"test={demo / 'data' / 'test.jsonl'}",
                    "--data", f"noisy={demo / 'data' / 'noisy.json'}", "--output", str(out), "--generate",
                     "--max-new-tokens", "12", "--batch-size", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    doc = json.loads(out.read_text())
    assert doc["model"] == str(finetuned)
    test = doc["results"]["test"]
    assert test["num_examples"] == 200 and test["perplexity"] == pytest.approx(2.718281828 ** test["loss"])
    assert test["num_checked"] == 200 and 0.0 <= test["accuracy"] <= 1.0
    assert doc["results"]["noisy"]["num_checked"] == 0  # "." carries no checkable answer
    assert "perplexity" in result.stderr  # the table


def test_eval_without_output_prints_the_results_on_stdout(finetuned, demo: Path, tmp_path: Path) -> None:
    result = run_cli("eval", "--model", str(finetuned[1]), "--data", f"test={demo / 'data' / 'test.jsonl'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)  # nothing else on stdout: the JSON pipes into jq
    assert doc["results"]["test"]["num_examples"] == 200
    assert list(tmp_path.iterdir()) == []  # and no file was written


def test_eval_bad_input(tmp_path: Path, demo: Path) -> None:
    result = run_cli("eval", "--model", str(tmp_path), "--data", "x=/nope.jsonl")
    assert result.returncode == 2
    assert "--data x: file not found: /nope.jsonl" in result.stderr and "not a model folder" in result.stderr


@pytest.mark.parametrize("text, answer", [
    ("so she pays 5 * 3 = 15\n#### 15", "15"),
    ("#### 1,234.0", "1234"),
    ("The total is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("2 + 3 = 5. The answer is 5.", "5"),
    ("we get 12 apples and then 7 pears", "7"),
    ("The answer is $-3.5$", "-3.5"),
    ("no number here", None),
])
def test_extract_answer(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer


@pytest.mark.parametrize("reference, generated, equal", [
    ("so 5 * 3 = 15\n#### 15", "She pays 15 dollars.\n#### 15", True),
    ("The answer is $\\frac{1}{2}$", "so the result is \\boxed{0.5}", True),
    ("#### 1,000", "The answer is 1000", True),
    ("The answer is $\\frac{3}{4}$", "\\boxed{\\frac{6}{8}}", True),
    ("#### 15", "#### 16", False),
    ("The answer is 7", "no answer at all", False),
])
def test_math_verify_compares_answers_as_math(reference: str, generated: str, equal: bool) -> None:
    pytest.importorskip("math_verify")
    assert math_verify_equal(reference, generated) is equal


@pytest.mark.slow  # the lm-eval harness end to end (unchanged code path); kept out of `make test` for its budget
def test_lm_eval_task_offline(finetuned, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    finetuned = finetuned[1]
    docs = tmp_path / "mc.jsonl"
    docs.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "choices": [str(a + b), str(a + b + 7)],
                                        "label": 0}) + "\n" for a, b in [(2, 3), (10, 4), (7, 7), (20, 1)]))
    task = tmp_path / "arith_mc.yaml"
    task.write_text(f"""task: scalebio_arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    out = tmp_path / "r.json"
    result = run_cli("eval", "--model", str(finetuned), "--lm-eval", str(task), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(out.read_text())["lm_eval"]["scalebio_arith_mc"]
    assert 0.0 <= metrics["acc,none"] <= 1.0


@pytest.mark.slow  # 45 s: the test budget (`make pipeline` runs it; test_docs runs the quickstart's five commands)
def test_pipeline_scalebio_sampling_beats_uniform(demo: Path, tmp_path: Path) -> None:
    """reweight -> sample (ScaleBiO, uniform) -> finetune each -> eval on the held-out test set."""
    recipe = write_recipe(tmp_path / "recipe.yaml", demo, finetune={**FT, "epochs": 1},
                          reweight={"steps": 100, "alpha": 1, "lr_u": 3e-3, "lr_w": 3e-3, "lr_lambda": 2e-2,
                                    "batch_size": 24, "val_batch_size": 8, "micro_batch_size": 32, "log_every": 20})
    run = tmp_path / "pipeline"
    env = {**os.environ, "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run([str(ROOT / "scripts" / "pipeline.sh"), str(recipe), str(demo / "data" / "test.jsonl"),
                             str(run), "320"], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    comparison = json.loads((run / "comparison.json").read_text())
    assert comparison["scalebio"]["test_loss"] < comparison["uniform"]["test_loss"]
    assert comparison["scalebio"]["counts"]["clean"] > comparison["uniform"]["counts"]["clean"]
    assert "scalebio" in result.stdout and "uniform" in result.stdout  # the side-by-side table
