"""Cheap structural checks of a model folder, before transformers sees it (no torch, reads headers only).

transformers and safetensors report a damaged file with a traceback from deep inside (`SafetensorError: Error
while deserializing header`, a `TypeError` for a config.json holding a list, a `KeyError` for a tokenizer.json that
is not a tokenizer). Here each file is checked for what makes it loadable, naming the file and the defect:
- config.json: a JSON object; its sizes (blocks, positions) are read for the recipe checks in preflight.py;
- a `.safetensors` file: the 8-byte header length, a JSON header of tensors, and data offsets that end exactly at
  the end of the file (a file cut short by a copy or a full disk fails this);
- a sharded index: a JSON object with a `weight_map` whose shards exist (and pass the check above);
- `pytorch_model.bin`: a complete zip archive (torch's format since 1.6; the central directory sits at the end, so a
  cut file has none);
- tokenizer.json: a JSON object with a `model` (what `tokenizers` needs); tokenizer_config.json: a JSON object.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path
from typing import Any

# What a Hugging Face model folder written by finetune holds (train/modeling.save_hf_folder replaces exactly these;
# preflight recognises a folder that holds a model by them).
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SAFETENSORS_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
# Bytes per element of the dtypes safetensors names; others (sub-byte formats) are left to the loader.
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the object, None) or (None, what is wrong with the file)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"{path} is not valid JSON ({exc})"
    except OSError as exc:
        return None, f"{path}: cannot read ({exc.strerror or exc})"
    if not isinstance(doc, dict):
        return None, f"{path} must hold a JSON object ({{...}}), got a {type(doc).__name__}"
    return doc, None


def safetensors_problem(path: Path) -> str | None:
    """What makes `path` an unreadable safetensors file, or None. Reads the header only."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path} is not a safetensors file (only {size} bytes; cut short?)"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, SAFETENSORS_MAX_HEADER):
                return f"{path} is cut short or not a safetensors file (header of {n:,} bytes in a {size:,}-byte file)"
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        return f"{path}: cannot read ({exc.strerror or exc})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{path} is damaged: its safetensors header is not JSON"
    if not isinstance(header, dict):
        return f"{path} is damaged: its safetensors header is not a JSON object"
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = _tensor_problem(name, info)
        if problem:
            return f"{path} is damaged: {problem}"
        spans.append((info["data_offsets"][0], info["data_offsets"][1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:  # safetensors requires the tensors to tile the data exactly, in order
            return f"{path} is damaged: tensor {name!r} starts at byte {start:,} of the data, expected {end:,}"
        end = stop
    data = size - 8 - n
    if data != end:
        what = "cut short" if data < end else "longer than its header says"
        return f"{path} is {what}: its tensors need {end:,} bytes of data, the file holds {data:,}"
    return None


def _tensor_problem(name: str, info: Any) -> str | None:
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        return f"tensor {name!r} has no valid data_offsets in the header"
    shape, width = info.get("shape"), DTYPE_BYTES.get(info.get("dtype"))
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"tensor {name!r} has no valid shape in the header"
    if width is not None and math.prod(shape) * width != offsets[1] - offsets[0]:
        return (f"tensor {name!r} ({info['dtype']} {shape}) needs {math.prod(shape) * width:,} bytes, its offsets "
                f"give {offsets[1] - offsets[0]:,}")
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _index_problems(index: Path) -> list[str]:
    doc, problem = read_json_object(index)
    if problem:
        return [problem]
    weight_map = doc.get("weight_map") if doc else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return [f"{index}: 'weight_map' must map tensor names to shard files"]
    problems = []
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if not path.is_file():
            problems.append(f"{index} names the shard {shard}, which is missing")
        elif path.suffix == ".safetensors" and (problem := safetensors_problem(path)):
            problems.append(problem)
    return problems


def weights_problems(folder: Path) -> list[str]:
    """Damage in the weight files of a model folder (absence is reported by the caller)."""
    problems = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            problems += _index_problems(folder / index)
    single = folder / "model.safetensors"
    if single.is_file() and (problem := safetensors_problem(single)):
        problems.append(problem)
    binary = folder / "pytorch_model.bin"
    if binary.is_file() and binary.stat().st_size and not zipfile.is_zipfile(binary):
        # A pre-1.6 pickle is not a zip either, but transformers refuses to unpickle those without weights_only.
        problems.append(f"{binary} is cut short or not a torch checkpoint (no complete zip archive)")
    return problems


def tokenizer_problems(folder: Path) -> list[str]:
    problems = []
    tok = folder / "tokenizer.json"
    if tok.is_file():
        doc, problem = read_json_object(tok)
        if problem:
            problems.append(problem)
        elif not isinstance(doc.get("model"), dict):  # type: ignore[union-attr]
            problems.append(f"{tok} is not a tokenizer (no 'model' object: not written by `tokenizers`)")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        _, problem = read_json_object(config)
        if problem:
            problems.append(problem)
    return problems


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs keep the language model's sizes under `text_config`."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def _first_int(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def num_blocks(config: dict[str, Any]) -> int | None:
    """Transformer blocks, under the names architectures use (Llama/Qwen, GPT-2, GPT-J/T5-style)."""
    return _first_int(_text_config(config), ("num_hidden_layers", "n_layer", "num_layers"))


def max_positions(config: dict[str, Any]) -> int | None:
    """The longest sequence the position embeddings cover (learned tables index past it; RoPE extrapolates badly)."""
    return _first_int(_text_config(config), ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"))
