"""LoRA (`reweight.lora`, `finetune.lora`): u and w as two adapters over one frozen base model.

The demo's answer (clean first, the corrupted copy last), bitwise resume after SIGKILL, 2 processes equal 1 within
1e-6, a fine-tuned LoRA model saved merged as a plain folder (plus its adapter), and the refusals; and LISA over the
adapters (`lora.r > 0` with `lisa.layers > 0`): only the drawn blocks' adapters train, resumed bitwise across draws.
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import invoke, write_recipe
from test_distributed import torchrun
from test_resume import kill_at, start_cli

pytest.importorskip("peft")

LORA = ["reweight.lora.r=8", "reweight.lisa.layers=0"]
# Short: half the demo's batch, a 5x lam learning rate, 30 steps. Enough for clean to win clearly; which of the
# two bad sources is last takes the demo's 200 steps (docs/results.md: noisy last, as in the full run).
RUN = [*LORA, "reweight.steps=30", "reweight.batch_size=12", "reweight.val_batch_size=4", "reweight.lr_lambda=1e-1",
       "reweight.log_every=5", "checkpoint.every=10", "checkpoint.keep=1"]


def reweight_in_process(recipe: Path, *args: str):
    return invoke("reweight", "--config", str(recipe), *args)


@pytest.fixture(scope="module")
def lora_run(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One uninterrupted LoRA reweight of the demo (in-process: the modules load once)."""
    recipe = write_recipe(tmp_path_factory.mktemp("lora") / "recipe.yaml", demo)
    result = reweight_in_process(recipe, *RUN)
    assert result.returncode == 0, result.stderr
    return recipe.parent / "run", json.loads((recipe.parent / "run" / "weights.json").read_text())


def test_lora_reweight_orders_the_demo_sources_like_the_full_run(lora_run, demo: Path) -> None:
    out, doc = lora_run
    w = doc["weights"]
    assert w["clean"] > 0.7 and w["noisy"] < 1 / 3 and w["offtopic"] < 1 / 3, w
    assert doc["config"]["reweight"]["lora"]["r"] == 8
    (ckpt,) = (out / "checkpoints").iterdir()  # checkpoint.keep=1
    saved = torch.load(ckpt / "u.pt", weights_only=True)
    assert saved["adapter"] and all(".lora_" in k and ".u." in k for k in saved["adapter"])  # adapters only
    assert saved["optimizer"]["state"]  # with their optimizer state
    base = (demo / "model" / "model.safetensors").stat().st_size
    assert (ckpt / "u.pt").stat().st_size < base / 2  # not a model copy: the base stays in the model folder


def test_lora_reweight_resumes_bitwise_after_sigkill(demo: Path, tmp_path: Path, lora_run) -> None:
    _, reference = lora_run
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    out = tmp_path / "run"
    proc = start_cli("reweight", "--config", str(recipe), *RUN)
    kill_at(out / "checkpoints" / "step-000010", proc)
    assert not (out / "weights.json").exists()
    result = reweight_in_process(recipe, *RUN, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr
    resumed = json.loads((out / "weights.json").read_text())
    assert resumed["weights"] == reference["weights"]  # bitwise
    assert resumed["weights_averaged"] == reference["weights_averaged"]
    assert resumed["trajectory"] == reference["trajectory"]


# LISA over the adapters: 1 of the demo's 4 blocks, re-drawn every 2 steps (draws 0-3 in 7 steps; checkpoints
# after 2, 4 and 6).
LISA = ["reweight.lora.r=8", "reweight.lisa.layers=1", "reweight.lisa.interval=2", "reweight.steps=7",
        "reweight.log_every=2", "reweight.lr_u=3e-2", "reweight.lr_w=3e-2", "checkpoint.every=2", "checkpoint.keep=3"]


def _block_of(name: str) -> int:
    """The block index in an adapter parameter's name (`...layers.3.self_attn.q_proj.lora_A.u.weight`)."""
    return int(name.split(".layers.")[1].split(".")[0])


def _adapters_by_block(saved: dict) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in saved["adapter"].items():
        out.setdefault(_block_of(name), {})[name] = tensor
    return out


def test_lisa_over_adapters_trains_only_the_drawn_blocks_and_resumes_bitwise(demo: Path, tmp_path: Path) -> None:
    """With LoRA and LISA together only the drawn blocks' adapters train: LoRA's B starts at zero, so a block never
    drawn keeps B = 0 (and u's A, which w copied); optimizer state exists only for the current draw's adapters. A
    run killed between draws resumes bitwise."""
    from scalebio_cli.train.lisa import draw_blocks

    recipe = write_recipe(tmp_path / "ref" / "recipe.yaml", demo)
    result = reweight_in_process(recipe, *LISA)
    assert result.returncode == 0, result.stderr
    assert "the adapters of LISA 1 of 4 blocks every 2 steps" in " ".join(result.stderr.split())
    out = recipe.parent / "run"
    reference = json.loads((out / "weights.json").read_text())
    assert reference["weights"] != reference["trajectory"][0]["weights"]
    drawn: set[int] = set()
    for step in (2, 4, 6):
        current = draw_blocks(4, 1, seed=0, draw=(step - 1) // 2)
        drawn |= set(current)
        for copy in ("u", "w"):
            saved = torch.load(out / "checkpoints" / f"step-{step:06d}" / f"{copy}.pt", weights_only=True)
            for block, tensors in _adapters_by_block(saved).items():
                b_zero = all(not t.any() for n, t in tensors.items() if ".lora_B." in n)
                assert b_zero == (block not in drawn), (copy, step, block, drawn)
            names = list(saved["adapter"])  # optimizer state is indexed in the adapter's parameter order
            with_state = {_block_of(names[int(i)]) for i in saved["optimizer"]["state"]}
            assert with_state == set(current), (copy, step, with_state, current)

    killed = write_recipe(tmp_path / "killed" / "recipe.yaml", demo)
    proc = start_cli("reweight", "--config", str(killed), *LISA)
    kill_at(killed.parent / "run" / "checkpoints" / "step-000004", proc)  # draw 1 saved; draw 2 comes after
    result = reweight_in_process(killed, *LISA, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    resumed = json.loads((killed.parent / "run" / "weights.json").read_text())
    assert resumed["weights"] == reference["weights"] and resumed["trajectory"] == reference["trajectory"]


# Adapters in every block (lisa.layers 0) all-reduce through the same code as LISA's subset: slow-marked to keep
# `make test` in its budget (`make test-slow` runs it).
@pytest.mark.parametrize("mode", [pytest.param(LORA, marks=pytest.mark.slow),
                                  ["reweight.lora.r=8", "reweight.lisa.layers=1", "reweight.lisa.interval=2"]],
                         ids=["lora", "lisa-over-adapters"])
def test_lora_two_processes_with_accumulation_equal_one(demo: Path, tmp_path: Path, mode: list[str]) -> None:
    short = [*mode, "reweight.steps=6", "reweight.log_every=3", "reweight.lr_u=3e-2", "reweight.lr_w=3e-2"]
    one = write_recipe(tmp_path / "one" / "recipe.yaml", demo)
    assert reweight_in_process(one, *short).returncode == 0
    two = write_recipe(tmp_path / "two" / "recipe.yaml", demo)
    # and micro-batches of 4: each process accumulates 3-4 of them (exact accumulation, checked at the same time)
    result = torchrun(2, "reweight", "--config", str(two), *short, "reweight.micro_batch_size=4")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "DDP x 2" in result.stderr and "LoRA r=8" in result.stderr
    a = json.loads((one.parent / "run" / "weights.json").read_text())
    b = json.loads((two.parent / "run" / "weights.json").read_text())
    assert a["weights"] != b["trajectory"][0]["weights"]  # the weights moved
    assert max(abs(a["weights"][k] - b["weights"][k]) for k in a["weights"]) < 1e-6, (a["weights"], b["weights"])


def test_lora_full_logits_give_the_head_only_weights(demo: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA's u and w (adapters over one base, the head reached through peft) take head-only losses too: the
    full-logits path (SCALEBIO_FULL_LOGITS=1) learns the same weights within 1e-5."""
    short = [*LORA, "reweight.steps=6", "reweight.log_every=3", "reweight.lr_u=3e-2", "reweight.lr_w=3e-2"]
    weights = []
    for full in ("0", "1"):
        monkeypatch.setenv("SCALEBIO_FULL_LOGITS", full)
        recipe = write_recipe(tmp_path / full / "recipe.yaml", demo)
        assert reweight_in_process(recipe, *short).returncode == 0
        weights.append(json.loads((recipe.parent / "run" / "weights.json").read_text())["weights"])
    head_only, full_logits = weights
    assert head_only != dict.fromkeys(head_only, 1 / 3)  # the weights moved
    assert max(abs(head_only[k] - full_logits[k]) for k in head_only) < 1e-5, (head_only, full_logits)


def test_finetune_lora_writes_a_merged_plain_folder_and_the_adapter(demo: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM


    ft = {"data": str(demo / "data" / "clean.jsonl"), "epochs": 0.05, "lr": 3e-2, "batch_size": 8,
          "micro_batch_size": 8, "log_every": 5, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}
    recipe = write_recipe(tmp_path / "recipe.yaml", demo, finetune=ft)
    result = invoke("finetune", "--config", str(recipe))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "run"
    base, merged = load_file(str(demo / "model" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert merged.keys() == base.keys()  # a plain folder: no lora_ or base_layer keys
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_finetune_lisa_over_the_adapter_changes_only_the_drawn_block(demo: Path, tmp_path: Path) -> None:
    """finetune.lora with finetune.lisa: one draw, so the merged model differs from the base in that block only."""
    from safetensors.torch import load_file

    from scalebio_cli.train.lisa import draw_blocks

    ft = {"data": str(demo / "data" / "clean.jsonl"), "epochs": 0.05, "lr": 3e-2, "batch_size": 8,
          "micro_batch_size": 8, "lora": {"r": 4}, "lisa": {"layers": 1, "interval": 1000}}
    recipe = write_recipe(tmp_path / "recipe.yaml", demo, finetune=ft)
    result = invoke("finetune", "--config", str(recipe))
    assert result.returncode == 0, result.stderr
    base, merged = load_file(str(demo / "model" / "model.safetensors")), load_file(str(tmp_path / "run" /
                                                                                     "model.safetensors"))
    (block,) = draw_blocks(4, 1, seed=0, draw=0)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.startswith(f"model.layers.{block}.") for k in changed), (block, changed)


def test_unknown_target_module_is_refused_naming_the_key(demo: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    result = reweight_in_process(recipe, *LORA, "reweight.lora.target_modules=[q_proj, qkv_proj]")
    assert result.returncode == 2, result.stderr
    assert "reweight.lora.target_modules: qkv_proj: no such module" in result.stderr
    assert "q_proj" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "weights.json").exists()


@pytest.mark.parametrize("override, message", [
    ("reweight.lora.r=-1", "reweight.lora.r: must be >= 0 (0 = no LoRA), got -1"),
    ("reweight.lora.dropout=1.5", "reweight.lora.dropout: must be in [0, 1), got 1.5"),
    ("reweight.lora.target_modules=[]", "reweight.lora.target_modules: needs module names"),
])
def test_bad_lora_recipes_exit_2(demo: Path, tmp_path: Path, override: str, message: str) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", demo)
    result = reweight_in_process(recipe, override)
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "run").exists()
