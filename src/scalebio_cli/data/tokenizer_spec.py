"""What a Rust tokenizer is made of, read from its components: the conditions the fast paths rest on (render.py
locating tokens by byte lengths, ascii_bpe.py tokenizing ASCII in Python)."""

from __future__ import annotations

import json
from typing import Any


def component_spec(component: Any) -> dict[str, Any] | None:
    """A tokenizer component's settings as tokenizer.json has them (the pre-tokenizer's, the post-processor's; not
    the model's, whose merges take ~0.1 s to parse)."""
    return None if component is None else json.loads(component.__getstate__())


def spec_pieces(spec: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """The components of a spec in order, Sequences (listed under `key`) flattened."""
    if spec is None:
        return []
    return [p for s in spec[key] for p in spec_pieces(s, key)] if spec.get("type") == "Sequence" else [spec]


def plain_bpe(backend: Any) -> bool:
    """A BPE model that turns each word into tokens and nothing else (no dropout, byte fallback, word prefixes or
    suffixes), no normalizer, and added tokens that strip no whitespace. Read through the model's attributes."""
    model = backend.model
    if (type(model).__name__ != "BPE" or model.dropout or model.byte_fallback or model.continuing_subword_prefix
            or model.end_of_word_suffix or backend.normalizer is not None):
        return False
    return not any(t.lstrip or t.rstrip for t in backend.get_added_tokens_decoder().values())
