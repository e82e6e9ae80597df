"""Render an example to token ids and a trainable mask (True exactly on response tokens).

A conversation is cut into alternating prompt and response text segments. The prompt segment ends with the
generation prompt (e.g. `<|im_start|>assistant\\n`), so the tokens the model is trained to produce are the tokens
it would generate at inference after `apply_chat_template(..., add_generation_prompt=True)`. The whole text is then
tokenized at once (a fast tokenizer reports each token's character span, which says whether it lies in a response
segment), so the tokens are exactly the tokenization of the whole conversation, never an unnatural split at a
segment boundary (`' ', '5'` instead of `' 5'`). Chat templates carry their own special tokens (BOS included), so
nothing is added (the reference code's double-BOS bug). Tokenizers without a chat template get a plain layout,
`User: ...\\n\\nAssistant: ...`, whose prompt ends at `Assistant:` so that the response starts with its natural
leading-space token, with BOS/EOS added by hand. Slow (non-Rust) tokenizers report no spans: their segments are
tokenized one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scalebio_cli.data.records import Example, Turn
from scalebio_cli.errors import InputError

PLAIN_ROLE_PREFIX = {"system": "", "user": "User: "}
PLAIN_GENERATION_PROMPT = "Assistant:"
PLAIN_RESPONSE_PREFIX = " "  # belongs to the response: `' 5'` is one token in most vocabularies


@dataclass
class Encoded:
    input_ids: list[int]
    trainable: list[bool]  # per token: is it a response token (the loss is taken on it)?
    full_length: int = 0  # tokens before truncation to max_length

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    @property
    def num_trainable(self) -> int:
        """Tokens that carry loss: position 0 is never predicted, so it does not count."""
        return sum(self.trainable[1:])


def _as_dicts(turns: list[Turn]) -> list[dict[str, str]]:
    return [{"role": t.role, "content": t.content} for t in turns]


class Renderer:
    """Turns examples into `Encoded` token sequences for one tokenizer and maximum length."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    # -- segments ----------------------------------------------------------------------------------------------

    def _template(self, turns: list[Turn], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            _as_dicts(turns), tokenize=False, add_generation_prompt=generation_prompt
        )

    def _template_segments(self, turns: list[Turn], where: str) -> list[tuple[str, bool]]:
        segments: list[tuple[str, bool]] = []
        done = ""  # text rendered so far
        for i, turn in enumerate(turns):
            if turn.role != "assistant" or i == 0:  # an opening assistant turn has no prompt to render: context
                continue
            prompt = self._template(turns[:i], generation_prompt=True)
            full = self._template(turns[: i + 1], generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise InputError(
                    f"{where}: the tokenizer's chat template does not render this conversation incrementally "
                    "(a prefix of the conversation does not render to a prefix of the whole), so the prompt "
                    "cannot be masked exactly; use a tokenizer whose template appends turns"
                )
            segments.append((prompt[len(done):], False))
            segments.append((full[len(prompt):], True))
            done = full
        return segments

    def _plain_segments(self, turns: list[Turn]) -> list[tuple[str, bool]]:
        tok = self.tokenizer
        segments: list[tuple[str, bool]] = []
        prompt = tok.bos_token or ""
        for turn in turns:
            if turn.role == "assistant":
                segments.append((prompt + PLAIN_GENERATION_PROMPT, False))
                segments.append((PLAIN_RESPONSE_PREFIX + turn.content + (tok.eos_token or ""), True))
                prompt = "\n\n"
            else:
                prompt += PLAIN_ROLE_PREFIX[turn.role] + turn.content + "\n\n"
        return segments

    def segments(self, example: Example, where: str = "record") -> list[tuple[str, bool]]:
        """Text segments with their trainable flag, in order."""
        if isinstance(example, str):
            tok = self.tokenizer
            return [((tok.bos_token or ""), False), (example + (tok.eos_token or ""), True)]
        if self.has_template:
            return self._template_segments(example, where)
        return self._plain_segments(example)

    # -- tokens ------------------------------------------------------------------------------------------------

    def encode_many(self, items: list[tuple[Example, str]]) -> list[Encoded]:
        """Encode `(example, where)` pairs with one batched tokenizer call; truncated on the right to max_length."""
        all_segments = [[(t, train) for t, train in self.segments(ex, where) if t] for ex, where in items]
        if not all_segments:
            return []
        if getattr(self.tokenizer, "is_fast", False):
            encoded = self._encode_whole(all_segments)
        else:
            encoded = self._encode_by_segment(all_segments)
        return [Encoded(ids[: self.max_length], mask[: self.max_length], len(ids)) for ids, mask in encoded]

    def _encode_whole(self, all_segments: list[list[tuple[str, bool]]]) -> list[tuple[list[int], list[bool]]]:
        """Tokenize each whole text; a token is trainable when it starts inside a response segment."""
        texts = ["".join(text for text, _ in segments) for segments in all_segments]
        backend = self._plain_backend()
        if backend is not None:  # the same call transformers makes, minus its per-record dict building (~30%)
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            pairs = ((e.ids, e.offsets) for e in encodings)
        else:
            batch = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            pairs = zip(batch["input_ids"], batch["offset_mapping"])
        out = []
        for segments, (ids, offsets) in zip(all_segments, pairs):
            bounds, pos = [], 0  # [start0, end0, start1, end1, ...] of the response segments, ascending
            for text, train in segments:
                if train:
                    bounds += [pos, pos + len(text)]
                pos += len(text)
            starts = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
            inside = np.searchsorted(np.asarray(bounds, dtype=np.int64), starts, side="right") % 2 == 1
            out.append((list(ids), inside.tolist()))
        return out

    def _plain_backend(self) -> Any:
        """The Rust tokenizer, when calling it directly gives what `tokenizer(texts, add_special_tokens=False)`
        gives: no truncation or padding configured on it and special tokens handled alike (transformers would set
        those per call)."""
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch"):
            return None
        same = (backend.truncation is None and backend.padding is None
                and getattr(backend, "encode_special_tokens", False) == bool(
                    getattr(self.tokenizer, "split_special_tokens", False)))
        return backend if same else None

    def _encode_by_segment(self, all_segments: list[list[tuple[str, bool]]]) -> list[tuple[list[int], list[bool]]]:
        flat = [text for segments in all_segments for text, _ in segments]
        pieces = iter(self.tokenizer(flat, add_special_tokens=False)["input_ids"])
        out = []
        for segments in all_segments:
            ids: list[int] = []
            trainable: list[bool] = []
            for _, train in segments:
                piece = next(pieces)
                ids.extend(piece)
                trainable.extend([train] * len(piece))
            out.append((ids, trainable))
        return out

    def encode(self, example: Example, where: str = "record") -> Encoded:
        return self.encode_many([(example, where)])[0]

    def encode_prompt(self, turns: list[Turn]) -> list[int]:
        """Token ids of the prompt before the last assistant turn, ending with the generation prompt (for eval)."""
        last = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=len(turns))
        context = turns[:last]
        if self.has_template:
            text = self._template(context, generation_prompt=True)
        else:  # everything up to the generation prompt, earlier assistant replies included
            segments = self._plain_segments(context + [Turn("assistant", "")])
            text = "".join(t for t, _ in segments[:-1])
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
