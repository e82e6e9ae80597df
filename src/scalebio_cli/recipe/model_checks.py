"""Up-front checks of the model a stage loads (before torch is imported): its folder (config, undamaged weights,
a tokenizer), a Hub id (reachable, or in the cache offline), whether it fits the recipe (LISA's blocks, positions),
and LoRA's needs (peft, a ZeRO stage it runs under). The files themselves are read by recipe/model_folder.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from scalebio_cli.files import did_you_mean
from scalebio_cli.recipe import model_folder
from scalebio_cli.recipe.load import looks_like_hub_id
from scalebio_cli.recipe.schema import Recipe

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_folder_problems(key: str, path: str, need_weights: bool = True, need_tokenizer: bool = True) -> list[str]:
    """Exists, has a config (a JSON object), undamaged weight files and a loadable-looking tokenizer."""
    p = Path(path)
    if p.suffix == ".gguf":  # one file holds weights, tokenizer and chat template
        if not p.is_file():
            return [f"{key}: GGUF file not found: {p}{did_you_mean(p)}"]
        with p.open("rb") as f:
            magic = f.read(4)
        return [] if magic == b"GGUF" else [f"{key}: {p} is not a GGUF file (it does not start with 'GGUF')"]
    if not p.exists():
        if looks_like_hub_id(path):
            return hub_model_problems(key, path, "config.json" if need_weights else "tokenizer_config.json")
        return [f"{key}: folder not found: {p}{did_you_mean(p)}"]
    if not p.is_dir():
        return [f"{key}: not a folder: {p}"]
    problems = []
    if need_weights:
        config = p / "config.json"
        if not config.is_file():
            problems.append(f"{key}: {p} is not a model folder (no config.json)")
        else:
            _, problem = model_folder.read_json_object(config)
            problems += [f"{key}: {problem}"] if problem else []
        if not any((p / name).is_file() for name in WEIGHT_FILES) and not list(p.glob("model-*.safetensors")):
            problems.append(f"{key}: {p} has no weights (expected {' or '.join(WEIGHT_FILES[:2])})")
        else:
            problems += [f"{key}: {problem}" for problem in model_folder.weights_problems(p)]
    return problems + (_tokenizer_files(key, p) if need_tokenizer else [])


HUB_PROBE_SECONDS = 3.0  # how long a Hub id waits for the Hub to answer before the run is refused


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the Hub opens within `timeout` seconds (name lookup included: it runs in a
    thread, since a lookup ignores socket timeouts)."""
    import socket
    import threading
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def hub_model_problems(key: str, repo_id: str, probe_file: str = "config.json") -> list[str]:
    """`org/name` that is no local folder names a Hub model: fine when the Hugging Face cache holds it or the Hub
    answers; otherwise refused now (exit 2), not after the loader's retries and a traceback."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, probe_file), str):
            return []  # downloaded before: transformers loads it from the cache
    except Exception:  # an id the Hub client rejects is reported below like any unreachable one
        pass
    if _hub_offline():
        why = "the Hub is off (HF_HUB_OFFLINE is set) and the Hugging Face cache does not hold it"
    elif not _hub_reachable():
        host = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        why = f"the Hub ({host}) cannot be reached and the Hugging Face cache does not hold it"
    else:
        return []
    return [f"{key}: '{repo_id}' is not a local path, so it names a Hub model, but {why}; set `{key}:` to a local "
            "model folder or a .gguf file (download it where a hub is reachable, e.g. `hf download "
            f"{repo_id} --local-dir DIR`)"]


def _tokenizer_files(key: str, p: Path) -> list[str]:
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        return [f"{key}: {p} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                "set `tokenizer:` to a folder that has them"]
    return [f"{key}: {problem}" for problem in model_folder.tokenizer_problems(p)]


def model_fit_problems(recipe: Recipe, stage: str) -> list[str]:
    """Values that are only wrong for this model (read from its config.json, before any weight loads)."""
    config, _ = model_folder.read_json_object(Path(recipe.model) / "config.json")
    if config is None:
        return []  # a hub id, or a config problem reported by model_folder_problems
    problems = []
    blocks, positions = model_folder.num_blocks(config), model_folder.max_positions(config)
    layers = (recipe.reweight if stage == "reweight" else recipe.finetune).lisa.layers
    if blocks is not None and layers > blocks:
        problems.append(f"{stage}.lisa.layers: {layers} is more than the {blocks} transformer blocks of "
                        f"{recipe.model}; use at most {blocks} (or 0 for all blocks)")
    if positions is not None and recipe.data.max_length > positions:
        problems.append(f"data.max_length: {recipe.data.max_length} is more than the {positions} positions "
                        f"{recipe.model} was built for (config.json); use at most {positions}")
    return problems


def lora_problems(recipe: Recipe, stage: str) -> list[str]:
    """LoRA (`STAGE.lora.r > 0`, with LISA over its adapters when `STAGE.lisa.layers > 0`) runs on our engine (one
    process or several) or on one DeepSpeed engine with ZeRO-2/3 (train/zero_adapters.py), and needs peft."""
    cfg = recipe.reweight if stage == "reweight" else recipe.finetune
    if cfg.lora.r <= 0:
        return []
    problems = []
    if recipe.deepspeed:
        zero_stage = deepspeed_stage(recipe.deepspeed)
        if zero_stage is not None and zero_stage not in (2, 3):
            problems.append(f"{stage}.lora.r: LoRA under DeepSpeed runs with ZeRO-2 or ZeRO-3 (the adapters of a run "
                            f"share one engine); {recipe.deepspeed} sets stage {zero_stage}")
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        problems.append(f"{stage}.lora.r: LoRA needs peft, which is not installed (pip install 'scalebio-cli[lora]')")
    return problems


def deepspeed_stage(path: str) -> int | None:
    """The ZeRO stage a DeepSpeed config file sets (0 when it sets none), or None when the file cannot be read
    (train/deepspeed_config.deepspeed_problems reports that)."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return config.get("zero_optimization", {}).get("stage", 0) if isinstance(config, dict) else None


def model_problems(recipe: Recipe, stage: str) -> list[str]:
    """The model and tokenizer folders, and whether the model fits the recipe (lisa.layers, data.max_length)."""
    problems = model_folder_problems("model", recipe.model, need_weights=True, need_tokenizer=not recipe.tokenizer)
    if recipe.tokenizer:
        problems += model_folder_problems("tokenizer", recipe.tokenizer, need_weights=False)
    return problems + model_fit_problems(recipe, stage)
