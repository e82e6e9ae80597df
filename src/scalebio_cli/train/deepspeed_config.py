"""The user's DeepSpeed config file: checked before any model loads, and completed with the values scalebio owns.

The recipe owns precision (`precision`), batch sizes (`STAGE.batch_size`, `STAGE.micro_batch_size`), clipping
(`STAGE.max_grad_norm`), the optimizer and the schedule. The file may leave them out or write "auto" (as in
transformers' Trainer configs); a different value is refused naming both places, never silently replaced. The rest
of the file is DeepSpeed's: it is validated with DeepSpeed's own config classes (`DeepSpeedConfig`, whose ZeRO
section is the pydantic model `DeepSpeedZeroConfig`), plus the few things DeepSpeed only asserts deep inside
`deepspeed.initialize` or model loading (an NVMe offload without `nvme_path`, an offload section without a device).
So a mistyped value is a one-line message naming the file at preflight, not a traceback or a blamed model later.

Nothing here imports torch or DeepSpeed at module level: preflight runs before the heavy imports, and only a
recipe with `deepspeed:` pays for importing DeepSpeed (its config classes) while being checked.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Any

OFFLOADS = ("offload_optimizer", "offload_param")
_OWNED_OPTIMIZER = ("optimizer", "scheduler")


def load_deepspeed_config(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def offloads_optimizer(config: dict[str, Any]) -> bool:
    """Does the config put the optimizer step on the CPU (ZeRO-Offload, `offload_optimizer` to cpu or nvme)? Then
    DeepSpeed steps with its CPU Adam and refuses a torch optimizer (`zero_force_ds_cpu_optimizer`)."""
    section = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return isinstance(section, dict) and section.get("device") in ("cpu", "nvme")


def finalize_deepspeed_config(base: dict[str, Any], micro_batches: int, world_size: int,
                              max_grad_norm: float | None, bf16: bool) -> dict[str, Any]:
    """The user's DeepSpeed config with the values scalebio owns filled in.

    Preflight (`deepspeed_problems`) has refused any of them that the file sets to something other than the
    recipe's value, so what is written here is what the file said or left to us ("auto", absent). Batch sizes
    are bookkeeping only: our micro-batches are counted, each with its own rows, and the engine is told the
    accumulation boundary, so DeepSpeed's micro-batch is 1 "sample" per forward.
    """
    config = copy.deepcopy(base)
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=micro_batches,
                  train_batch_size=micro_batches * world_size, gradient_clipping=max_grad_norm or 0.0,
                  zero_allow_untested_optimizer=True, wall_clock_breakdown=False)
    config.setdefault("steps_per_print", 1 << 30)
    config.pop("fp16", None)
    section = config.pop("bfloat16", None) or config.get("bf16")  # "bfloat16": DeepSpeed's older spelling
    config["bf16"] = {**(section if isinstance(section, dict) else {}), "enabled": bf16}
    return config


def deepspeed_problems(path: str | None, recipe: Any, stage: str, world_size: int) -> list[str]:
    """Every problem of the recipe's DeepSpeed file for `stage` ("reweight" or "finetune"), each naming the file."""
    if not path:
        return []
    import importlib.util

    installed = importlib.util.find_spec("deepspeed") is not None
    problems = [] if installed else ["deepspeed: this recipe trains with DeepSpeed, which is not installed "
                                     "(pip install 'scalebio-cli[deepspeed]')"]
    p = Path(path)
    if not p.is_file():
        from scalebio_cli.files import did_you_mean

        return problems + [f"deepspeed: config file not found: {p}{did_you_mean(p)}"]
    try:
        config = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return problems + [f"deepspeed: {p} is not valid JSON ({exc})"]
    except OSError as exc:
        return problems + [f"deepspeed: cannot read {p} ({exc})"]
    if not isinstance(config, dict):
        return problems + [f"deepspeed: {p} must hold a JSON object ({{...}}), got {type(config).__name__}"]
    found = structure_problems(config) + owned_problems(config, recipe, stage, world_size)
    if installed and not found:  # DeepSpeed's own checks of the rest (they assume the structure holds)
        found = deepspeed_validation_problems(config) + op_problems(config)
    return problems + [f"deepspeed: {p}: {problem}" for problem in found]


# -- what DeepSpeed checks only at initialize (or not at all) ------------------------------------------------------

def structure_problems(config: dict[str, Any]) -> list[str]:
    """The ZeRO stage, and offload sections complete enough to run (DeepSpeed asserts `nvme_path` only while it
    partitions the model, and treats an offload without a device as no offload)."""
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return [f"zero_optimization must be a JSON object, got {type(zero).__name__}"]
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        return [f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}"]
    problems = []
    for kind in OFFLOADS:
        section = zero.get(kind)
        if section is None:
            continue
        key = f"zero_optimization.{kind}"
        if not isinstance(section, dict):
            problems.append(f"{key} must be a JSON object, got {type(section).__name__}")
            continue
        device = section.get("device")
        if device is None:
            problems.append(f"{key} has no device: set \"device\": \"cpu\" (or \"nvme\" with \"nvme_path\"), or "
                            "remove the section")
        elif device == "nvme" and not section.get("nvme_path"):
            problems.append(f"{key}.device is \"nvme\" but no nvme_path is set: add \"nvme_path\": the folder on "
                            "the NVMe drive DeepSpeed swaps to (or use \"device\": \"cpu\")")
        if device in ("cpu", "nvme") and kind == "offload_param" and stage != 3:
            problems.append(f"{key} works only with ZeRO stage 3 (parameters are partitioned there), and "
                            f"zero_optimization.stage is {stage}")
        if device in ("cpu", "nvme") and kind == "offload_optimizer" and stage == 0:
            problems.append(f"{key} needs ZeRO stage 1, 2 or 3, and zero_optimization.stage is 0")
    return problems


def owned_problems(config: dict[str, Any], recipe: Any, stage: str, world_size: int) -> list[str]:
    """Values the recipe owns, set in the file to something else (transformers' Trainer refuses the same)."""
    cfg = getattr(recipe, stage)
    problems = _precision_problems(config, recipe.precision)
    local = cfg.batch_size // max(1, world_size)
    owned = {
        "gradient_clipping": (cfg.max_grad_norm or 0.0, f"{stage}.max_grad_norm is {cfg.max_grad_norm}"),
        "train_batch_size": (cfg.batch_size, f"{stage}.batch_size is {cfg.batch_size}"),
        "train_micro_batch_size_per_gpu": (cfg.micro_batch_size, f"{stage}.micro_batch_size is {cfg.micro_batch_size}"),
        "gradient_accumulation_steps": (-(-local // cfg.micro_batch_size),
                                        f"{stage}.batch_size {cfg.batch_size} over {world_size} process(es) in "
                                        f"micro-batches of {stage}.micro_batch_size {cfg.micro_batch_size} makes "
                                        f"{-(-local // cfg.micro_batch_size)}"),
    }
    for key, (ours, where) in owned.items():
        value = config.get(key, "auto")
        if value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key} must be a number or \"auto\", got {value!r}")
        elif float(value) != float(ours):
            problems.append(f"{key} is {value}, but the recipe's {where}: the recipe owns it; write \"auto\" (or "
                            "nothing) here, or change the recipe")
    for key in _OWNED_OPTIMIZER:
        if key in config:
            what = "optimizer (AdamW" if key == "optimizer" else "learning-rate schedule (warm-up and cosine"
            problems.append(f"sets \"{key}\", but the recipe owns the {what}, from its {stage} section): "
                            "remove that section")
    return problems


def _precision_problems(config: dict[str, Any], precision: str) -> list[str]:
    enabled = {}
    problems = []
    for key in ("fp16", "bf16", "bfloat16"):
        section = config.get(key)
        if section is None:
            continue
        if not isinstance(section, dict):
            problems.append(f"{key} must be a JSON object, got {type(section).__name__}")
            continue
        value = section.get("enabled", False)  # DeepSpeed's default: a section without `enabled` is off
        if value != "auto" and not isinstance(value, bool):
            problems.append(f"{key}.enabled must be true, false or \"auto\", got {value!r}")
        elif value != "auto":
            enabled["bf16" if key == "bfloat16" else key] = value
    if enabled.get("fp16") and enabled.get("bf16"):
        return problems + ["fp16 and bf16 are both enabled; at most one can be (and the recipe's `precision` "
                           "decides: set both to \"auto\" or remove them)"]
    if enabled.get("fp16"):
        problems.append(f"fp16.enabled is true, but the recipe's precision is {precision} and scalebio does not "
                        "train in fp16: remove the fp16 section (the recipe's precision: bf16 for half precision)")
    if "bf16" in enabled and enabled["bf16"] != (precision == "bf16"):
        state = "true" if enabled["bf16"] else "false"
        meaning = " (bf16 on a GPU, fp32 on a CPU)" if precision == "auto" else ""
        problems.append(f"bf16.enabled is {state}, but the recipe's precision is {precision}{meaning}: the recipe "
                        "owns precision; write \"auto\" (or nothing) here and set `precision:` in the recipe")
    return problems


# -- DeepSpeed's own validation -------------------------------------------------------------------------------------

_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16",
             "DeepSpeedFP16Config": "fp16", "DeepSpeedActivationCheckpointingConfig": "activation_checkpointing",
             "DeepSpeedCommsConfig": "comms_logger", "DeepSpeedMonitorConfig": "monitor"}


def deepspeed_validation_problems(config: dict[str, Any]) -> list[str]:
    """What DeepSpeed's `DeepSpeedConfig` refuses in the file, completed with our values as the engine will be."""
    _quiet_accelerator()
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(finalize_deepspeed_config(config, 1, 1, None, bf16=False))
    except pydantic.ValidationError as exc:
        return [_pydantic_problem(exc.title, error) for error in exc.errors()]
    except (AssertionError, ValueError, TypeError, KeyError, AttributeError) as exc:
        text = str(exc).strip().splitlines()
        return [f"DeepSpeed refuses it: {text[0] if text else type(exc).__name__}"]
    return []


def _pydantic_problem(title: str, error: Any) -> str:
    section = _SECTIONS.get(title, title)
    loc = ".".join(str(part) for part in error["loc"])
    key = f"{section}.{loc}" if loc else section
    if error["type"] == "extra_forbidden":
        return f"{key} is not a DeepSpeed setting{_close_field(title, str(error['loc'][-1]))}"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def _close_field(title: str, name: str) -> str:
    if title != "DeepSpeedZeroConfig":
        return ""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    names = [f.alias or n for n, f in DeepSpeedZeroConfig.model_fields.items()]
    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def op_problems(config: dict[str, Any]) -> list[str]:
    """ZeRO-Offload steps with DeepSpeed's CPU Adam, a C++ op built on first use unless DeepSpeed was installed with
    it prebuilt (DS_BUILD_CPU_ADAM=1): say so now rather than after the model has loaded."""
    if not offloads_optimizer(config):
        return []
    import shutil

    from deepspeed.git_version_info import installed_ops

    compiler = os.environ.get("CXX", "c++")
    if installed_ops.get("cpu_adam") or shutil.which(compiler):
        return []
    return [f"zero_optimization.offload_optimizer steps with DeepSpeed's CPU Adam, which this DeepSpeed install "
            f"does not have prebuilt and which cannot be compiled here (no C++ compiler `{compiler}` found): install "
            "one, or reinstall DeepSpeed with DS_BUILD_CPU_ADAM=1"]


def _quiet_accelerator() -> None:
    """DeepSpeed prints a warning when it guesses the CPU accelerator; a CPU run states it (as distributed.setup
    does). Only when no accelerator was named and torch sees no GPU."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
