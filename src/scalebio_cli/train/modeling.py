"""Loading and saving models and tokenizers, and finding the transformer blocks of any causal LM without a
model-type flag."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scalebio_cli.console import console
from scalebio_cli.errors import InputError
from scalebio_cli.recipe.model_folder import MODEL_FILES
from scalebio_cli.train import process

try:
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # pragma: no cover - older safetensors keep it in the Rust module only
    from safetensors._safetensors_rust import SafetensorError as _SafetensorError


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The one precision -> dtype rule: `auto` means bf16 on a GPU and fp32 on a CPU (bf16 matmuls on CPU are slow
    and not bitwise stable)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def is_gguf(path: str) -> bool:
    return str(path).endswith(".gguf")


def _source(path: str) -> tuple[str, dict[str, Any]]:
    """What `from_pretrained` needs: a folder (or hub id), or a GGUF file as (its folder, gguf_file=name).
    transformers dequantizes a GGUF file into a normal float model; its tokenizer and chat template come from the
    same file."""
    if is_gguf(path):
        file = Path(path)
        return str(file.parent), {"gguf_file": file.name}
    return path, {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str | None = None) -> Any:
    """The tokenizer at `path`, padded; `chat_template`: a Jinja file that replaces its chat template (rendering
    then uses it for every record, the token cache is keyed by it, and save_pretrained stores it)."""
    from transformers import AutoTokenizer

    where, extra = _source(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except Exception as exc:
        # A damaged tokenizer file surfaces as anything: a bare Exception from the Rust `tokenizers`, a KeyError or
        # TypeError from transformers. Loading a tokenizer trains nothing, so a failure here is the folder's.
        raise InputError(f"{path}: cannot load a tokenizer ({_first_line(exc)})") from None
    if chat_template:
        try:
            tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{chat_template}: cannot read the chat template ({exc})") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any existing token serves.
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is None:
            raise InputError(f"{path}: the tokenizer has no pad, eos, unk or bos token to pad batches with")
        tokenizer.pad_token = fallback
    return tokenizer


def load_model(path: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # transformers' own tqdm bars (loading and saving shards) help on a terminal, once; in a log file they are
    # carriage-return noise, and under torchrun every process would draw one.
    if console.is_terminal and process.is_main():
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()

    where, extra = _source(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    except torch.OutOfMemoryError:
        raise  # the machine's limit, not the folder's fault (exit 1, with its traceback)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, EOFError, _SafetensorError) as exc:
        # What a damaged folder raises from inside transformers: a truncated shard (SafetensorError), a config of
        # the wrong shape (TypeError/KeyError), a cut pickle (EOFError, RuntimeError from the zip reader), tensors
        # of the wrong size (RuntimeError). preflight names most of these first; this catches the rest.
        raise InputError(f"{path}: cannot load a causal LM ({_first_line(exc)})") from None
    if getattr(model.config, "quantization_config", None) is not None and is_gguf(path):
        # Dequantized on load: the weights are plain floats now. The marker would make save_pretrained refuse
        # ("quantized with gguf, not serializable"), and a fine-tuned model is a plain folder.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    model.config.use_cache = False  # training never reuses a KV cache
    return model.to(device)


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool) -> None:
    if gradient_checkpointing:
        # Non-reentrant checkpointing: with LISA the lowest active block's input may need no grad, which the
        # reentrant variant would turn into "no gradient for this block".
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()


def count_parameters(module: nn.Module) -> int:
    """Parameters of `module`, also when ZeRO-3 has partitioned them (their full size is then `ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks: the ModuleList of identical modules whose length is the model's layer count.

    Works for Llama, Qwen2, Mistral, Gemma (`model.layers`), GPT-2 (`transformer.h`), GPT-NeoX (`gpt_neox.layers`)
    and any other architecture that keeps its blocks in one ModuleList, which is how transformers builds them.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    expected = getattr(text_config, "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if expected is not None and len(module) != expected:
            continue
        size = count_parameters(module)
        candidates.append((size, name, module))
    if not candidates:
        raise InputError(f"{getattr(config, '_name_or_path', '') or 'model'}: cannot find the transformer blocks of "
                         f"{type(model).__name__} (no ModuleList of {expected} identical blocks), which LISA "
                         "trains a few at a time; set lisa.layers: 0 to train all parameters")
    return max(candidates, key=lambda c: c[0])[2]


def save_hf_folder(model: torch.nn.Module, tokenizer: Any, out: Path, state_dict: dict[str, Any] | None = None) -> None:
    """Write a Hugging Face folder into `out` without ever leaving a half-written model there.

    Files are saved into a temporary folder first and moved in with config.json last: a folder that has
    config.json is complete.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".model-tmp-", dir=out))
    try:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for stale in MODEL_FILES:  # a previous model's files must not mix with the new ones
            (out / stale).unlink(missing_ok=True)
        for shard in out.glob("model-*-of-*.safetensors"):
            shard.unlink()
        for name in sorted((p.name for p in tmp.iterdir()), key=lambda n: n == "config.json"):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
