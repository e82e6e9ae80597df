"""The DeepSpeed config file is checked at preflight (train/deepspeed_config.py): DeepSpeed's own validation and the
values the recipe owns, one message per problem naming the file. The same cases through the CLI (exit 2, no
traceback, nothing written) are in tests/bad_inputs.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT

pytest.importorskip("deepspeed")


def recipe(precision: str = "auto", batch_size: int = 32, micro_batch_size: int = 8,
           max_grad_norm: float | None = 1.0) -> SimpleNamespace:
    stage = SimpleNamespace(batch_size=batch_size, micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm)
    return SimpleNamespace(precision=precision, reweight=stage, finetune=stage)


def problems(tmp_path: Path, config: object, rec: SimpleNamespace | None = None, world_size: int = 1,
             stage: str = "reweight") -> list[str]:
    from scalebio_cli.train.deepspeed_config import deepspeed_problems

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    found = deepspeed_problems(str(path), rec or recipe(), stage, world_size)
    assert all(p.startswith(f"deepspeed: {path}: ") for p in found), found  # every message names the file
    return [p.removeprefix(f"deepspeed: {path}: ") for p in found]


def test_the_shipped_configs_pass_with_the_shipped_recipes() -> None:
    from scalebio_cli.recipe.load import load_recipe
    from scalebio_cli.train.deepspeed_config import deepspeed_problems

    checked = 0
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        rec = load_recipe(path)
        if rec.deepspeed:
            for stage in ("reweight", "finetune"):
                assert deepspeed_problems(rec.deepspeed, rec, stage, 8) == [], (path, stage)
            checked += 1
    assert checked >= 3


def test_a_mistyped_value_is_deepspeeds_validation_message_naming_the_key(tmp_path: Path) -> None:
    found = problems(tmp_path, {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "lots"}})
    assert found == ["zero_optimization.stage3_max_live_parameters: Input should be a valid integer, unable to parse "
                     "string as an integer (got 'lots')"]


def test_an_unknown_key_is_named_with_the_closest_known_one(tmp_path: Path) -> None:
    found = problems(tmp_path, {"zero_optimization": {"stage": 3, "stage3_max_live_param": 10}})
    assert found == ["zero_optimization.stage3_max_live_param is not a DeepSpeed setting (did you mean "
                     "stage3_max_live_parameters?)"]


@pytest.mark.parametrize("stage", [5, -1, "three", True])
def test_a_bad_stage(tmp_path: Path, stage: object) -> None:
    assert problems(tmp_path, {"zero_optimization": {"stage": stage}}) == [
        f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}"]


def test_nvme_offload_without_nvme_path(tmp_path: Path) -> None:
    for kind in ("offload_optimizer", "offload_param"):
        found = problems(tmp_path, {"zero_optimization": {"stage": 3, kind: {"device": "nvme"}}})
        assert found == [f"zero_optimization.{kind}.device is \"nvme\" but no nvme_path is set: add \"nvme_path\": "
                         "the folder on the NVMe drive DeepSpeed swaps to (or use \"device\": \"cpu\")"]


def test_offload_without_its_device_settings(tmp_path: Path) -> None:
    assert problems(tmp_path, {"zero_optimization": {"stage": 3, "offload_optimizer": {"pin_memory": True}}}) == [
        "zero_optimization.offload_optimizer has no device: set \"device\": \"cpu\" (or \"nvme\" with "
        "\"nvme_path\"), or remove the section"]
    assert problems(tmp_path, {"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}}) == [
        "zero_optimization.offload_param.device: Input should be 'none', 'cpu' or 'nvme' (got 'gpu')"]
    assert problems(tmp_path, {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}) == [
        "zero_optimization.offload_param works only with ZeRO stage 3 (parameters are partitioned there), and "
        "zero_optimization.stage is 2"]


def test_fp16_and_bf16_both_enabled(tmp_path: Path) -> None:
    assert problems(tmp_path, {"fp16": {"enabled": True}, "bf16": {"enabled": True}}, recipe("bf16")) == [
        "fp16 and bf16 are both enabled; at most one can be (and the recipe's `precision` decides: set both to "
        "\"auto\" or remove them)"]


def test_precision_set_in_the_file_must_be_the_recipes(tmp_path: Path) -> None:
    assert problems(tmp_path, {"bf16": {"enabled": True}}, recipe("bf16")) == []
    assert problems(tmp_path, {"bf16": {"enabled": "auto"}}, recipe("auto")) == []
    assert problems(tmp_path, {"bf16": {"enabled": False}, "fp16": {"enabled": False}}, recipe("fp32")) == []
    assert problems(tmp_path, {"bf16": {"enabled": True}}, recipe("auto")) == [
        "bf16.enabled is true, but the recipe's precision is auto (bf16 on a GPU, fp32 on a CPU): the recipe owns "
        "precision; write \"auto\" (or nothing) here and set `precision:` in the recipe"]
    assert problems(tmp_path, {"bfloat16": {"enabled": False}}, recipe("bf16")) == [
        "bf16.enabled is false, but the recipe's precision is bf16: the recipe owns precision; write \"auto\" (or "
        "nothing) here and set `precision:` in the recipe"]
    assert problems(tmp_path, {"fp16": {"enabled": True}}, recipe("fp32")) == [
        "fp16.enabled is true, but the recipe's precision is fp32 and scalebio does not train in fp16: remove the "
        "fp16 section (the recipe's precision: bf16 for half precision)"]
    assert problems(tmp_path, {"bf16": {"enabled": "yes"}}) == ["bf16.enabled must be true, false or \"auto\", "
                                                                "got 'yes'"]


def test_clipping_and_batch_sizes_set_in_the_file_must_be_the_recipes(tmp_path: Path) -> None:
    rec = recipe(batch_size=64, micro_batch_size=2, max_grad_norm=1.0)
    same = {"gradient_clipping": 1.0, "train_batch_size": 64, "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 4}
    assert problems(tmp_path, same, rec, world_size=8) == []
    assert problems(tmp_path, dict.fromkeys(same, "auto"), rec, world_size=8) == []
    found = problems(tmp_path, {"gradient_clipping": 0.5, "train_batch_size": 128,
                                "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8}, rec,
                     world_size=8, stage="finetune")
    assert found == [
        "gradient_clipping is 0.5, but the recipe's finetune.max_grad_norm is 1.0: the recipe owns it; write \"auto\" "
        "(or nothing) here, or change the recipe",
        "train_batch_size is 128, but the recipe's finetune.batch_size is 64: the recipe owns it; write \"auto\" (or "
        "nothing) here, or change the recipe",
        "train_micro_batch_size_per_gpu is 4, but the recipe's finetune.micro_batch_size is 2: the recipe owns it; "
        "write \"auto\" (or nothing) here, or change the recipe",
        "gradient_accumulation_steps is 8, but the recipe's finetune.batch_size 64 over 8 process(es) in "
        "micro-batches of finetune.micro_batch_size 2 makes 4: the recipe owns it; write \"auto\" (or nothing) "
        "here, or change the recipe"]
    # no clipping in the recipe is DeepSpeed's 0
    assert problems(tmp_path, {"gradient_clipping": 0}, recipe(max_grad_norm=None)) == []
    assert problems(tmp_path, {"gradient_clipping": "lots"}) == ["gradient_clipping must be a number or \"auto\", "
                                                                 "got 'lots'"]


def test_the_optimizer_and_schedule_belong_to_the_recipe(tmp_path: Path) -> None:
    found = problems(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
                                "scheduler": {"type": "WarmupLR"}})
    assert found == ["sets \"optimizer\", but the recipe owns the optimizer (AdamW, from its reweight section): "
                     "remove that section",
                     "sets \"scheduler\", but the recipe owns the learning-rate schedule (warm-up and cosine, from "
                     "its reweight section): remove that section"]


def test_not_a_json_object(tmp_path: Path) -> None:
    from scalebio_cli.train.deepspeed_config import deepspeed_problems

    (tmp_path / "list.json").write_text("[1, 2]")
    assert deepspeed_problems(str(tmp_path / "list.json"), recipe(), "reweight", 1) == [
        f"deepspeed: {tmp_path / 'list.json'} must hold a JSON object ({{...}}), got list"]


def test_finalize_fills_what_the_recipe_owns_and_keeps_the_rest() -> None:
    from scalebio_cli.train.deepspeed_config import finalize_deepspeed_config

    user = {"bf16": {"enabled": "auto", "immediate_grad_update": True}, "gradient_clipping": "auto",
            "train_batch_size": "auto", "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}
    done = finalize_deepspeed_config(user, micro_batches=3, world_size=2, max_grad_norm=2.0, bf16=True)
    assert done["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert (done["gradient_clipping"], done["train_batch_size"], done["gradient_accumulation_steps"]) == (2.0, 6, 3)
    assert done["zero_optimization"] == user["zero_optimization"] and user["gradient_clipping"] == "auto"
