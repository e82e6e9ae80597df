"""Render examples to token ids and a trainable mask (True exactly on response tokens).

A conversation is cut into alternating prompt and response text segments. The prompt segment ends with the
generation prompt (e.g. `<|im_start|>assistant\\n`), so the tokens the model is trained to produce are the tokens
it would generate at inference after `apply_chat_template(..., add_generation_prompt=True)`. The whole text is then
tokenized at once, and the character offset of each token in the text says whether it lies in a response
segment, so the tokens are exactly the tokenization of the whole conversation, never an unnatural split at a
segment boundary (`' ', '5'` instead of `' 5'`). Chat templates carry their own special tokens (BOS included), so
nothing is added (the reference code's double-BOS bug). Tokenizers without a chat template get a plain layout,
`User: ...\\n\\nAssistant: ...`, whose prompt ends at `Assistant:` so that the response starts with its natural
leading-space token, with BOS/EOS added by hand. Slow (non-Rust) tokenizers report no offsets: their segments are
tokenized one by one.

Records are rendered and tokenized a chunk at a time, through public batched calls only (`apply_chat_template` on
a list of conversations, `tokenizer(texts, return_offsets_mapping=True)`), into flat numpy arrays, with no Python
loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from scalebio_cli.data.read.records import Example, Turn
from scalebio_cli.errors import InputError

PLAIN_ROLE_PREFIX = {"system": "", "user": "User: "}
PLAIN_GENERATION_PROMPT = "Assistant:"
PLAIN_RESPONSE_PREFIX = " "  # belongs to the response: `' 5'` is one token in most vocabularies

Segments = list[tuple[str, bool]]  # text segments with their trainable flag, in order


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


@dataclass
class TokenBatch:
    """Records tokenized whole (not truncated), their tokens concatenated."""

    ids: np.ndarray  # int32
    trainable: np.ndarray  # bool, same length
    lengths: np.ndarray  # int64, tokens per record

    @classmethod
    def empty(cls, records: int = 0) -> TokenBatch:
        return cls(np.zeros(0, np.int32), np.zeros(0, bool), np.zeros(records, np.int64))


def _as_dicts(turns: list[Turn]) -> list[dict[str, str]]:
    return [{"role": t.role, "content": t.content} for t in turns]


class Renderer:
    """Turns examples into token sequences for one tokenizer and maximum length."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    # -- segments ----------------------------------------------------------------------------------------------

    def _template(self, turns: list[Turn], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            _as_dicts(turns), tokenize=False, add_generation_prompt=generation_prompt
        )

    def _template_segments(self, turns: list[Turn], where: str) -> Segments:
        """One conversation, each prefix rendered by apply_chat_template in turn: the reference for
        _template_segments_many, which falls back to it so that an error is raised exactly where it arises."""
        segments: Segments = []
        done = ""  # text rendered so far
        for i, turn in enumerate(turns):
            if turn.role != "assistant" or i == 0:  # an opening assistant turn has no prompt to render: context
                continue
            prompt = self._template(turns[:i], generation_prompt=True)
            full = self._template(turns[: i + 1], generation_prompt=False)
            done = _append_turn(segments, done, prompt, full, where)
        return segments

    def _render_many(self, conversations: list[list[dict[str, str]]], generation_prompt: bool) -> list[str]:
        """Each conversation as `apply_chat_template(conversation, tokenize=False, add_generation_prompt=...)`
        renders it, in one batched call."""
        return self.tokenizer.apply_chat_template(conversations, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _template_segments_many(self, conversations: list[tuple[list[Turn], str]]) -> list[Segments]:
        """The segments of many conversations, from two template calls in all (one for the prompts, one for the
        prompts with their responses) instead of two per assistant turn: the per-call work of apply_chat_template
        costs more than rendering a short conversation."""
        prompts: list[list[dict[str, str]]] = []  # every prefix that ends before an assistant turn
        fulls: list[list[dict[str, str]]] = []  # the same prefixes with that assistant turn
        counts = []
        for turns, _ in conversations:
            messages = _as_dicts(turns)
            before = len(prompts)
            for i, turn in enumerate(turns):
                if turn.role == "assistant" and i > 0:  # an opening assistant turn has no prompt to render: context
                    prompts.append(messages[:i])
                    fulls.append(messages[: i + 1])
            counts.append(len(prompts) - before)
        try:
            prompt_texts = self._render_many(prompts, True) if prompts else []
            full_texts = self._render_many(fulls, False) if fulls else []
            out, k = [], 0
            for (_, where), n in zip(conversations, counts):
                out.append(_cut(prompt_texts[k: k + n], full_texts[k: k + n], where))
                k += n
            return out
        except Exception:
            # Render one conversation after the other, so that the error raised is the first one in record order
            # (the batched calls render every prompt before any response).
            return [self._template_segments(turns, where) for turns, where in conversations]

    def _plain_segments(self, turns: list[Turn]) -> Segments:
        tok = self.tokenizer
        segments: Segments = []
        prompt = tok.bos_token or ""
        for turn in turns:
            if turn.role == "assistant":
                segments.append((prompt + PLAIN_GENERATION_PROMPT, False))
                segments.append((PLAIN_RESPONSE_PREFIX + turn.content + (tok.eos_token or ""), True))
                prompt = "\n\n"
            else:
                prompt += PLAIN_ROLE_PREFIX[turn.role] + turn.content + "\n\n"
        return segments

    def _text_segments(self, text: str) -> Segments:
        tok = self.tokenizer
        return [((tok.bos_token or ""), False), (text + (tok.eos_token or ""), True)]

    def segments(self, example: Example, where: str = "record") -> Segments:
        """Text segments with their trainable flag, in order."""
        return self.segments_many([(example, where)])[0]

    def segments_many(self, items: list[tuple[Example, str]]) -> list[Segments]:
        """The segments of `(example, where)` pairs (errors name `where`)."""
        out: list[Segments | None] = [None] * len(items)
        conversations = []  # (position, turns, where) of the examples the chat template renders
        for k, (example, where) in enumerate(items):
            if isinstance(example, str):
                out[k] = self._text_segments(example)
            elif self.has_template:
                conversations.append((k, example, where))
            else:
                out[k] = self._plain_segments(example)
        if conversations:
            rendered = self._template_segments_many([(turns, where) for _, turns, where in conversations])
            for (k, _, _), segments in zip(conversations, rendered):
                out[k] = segments
        return out  # type: ignore[return-value]

    # -- tokens ------------------------------------------------------------------------------------------------

    def encode_batch(self, items: list[tuple[Example, str]]) -> TokenBatch:
        """Tokenize `(example, where)` pairs with one batched tokenizer call (not truncated)."""
        all_segments = [[(t, train) for t, train in segments if t] for segments in self.segments_many(items)]
        if not all_segments:
            return TokenBatch.empty()
        if getattr(self.tokenizer, "is_fast", False):
            return self._encode_whole(all_segments)
        return self._encode_by_segment(all_segments)

    def encode(self, example: Example, where: str = "record") -> Encoded:
        """One example, truncated on the right to max_length."""
        batch = self.encode_batch([(example, where)])
        keep = slice(0, self.max_length)
        return Encoded(batch.ids[keep].tolist(), batch.trainable[keep].tolist(), int(batch.lengths[0]))

    def _encode_whole(self, all_segments: list[Segments]) -> TokenBatch:
        """Tokenize each whole text; a token is trainable when it starts inside a response segment, by the
        character offset the tokenizer reports for it."""
        texts = ["".join(text for text, _ in segments) for segments in all_segments]
        # verbose=False: the whole text is tokenized on purpose and cut to max_length afterwards
        # (encode_chunks.truncate), so transformers' warning about texts longer than the model takes is noise here.
        batch = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                               return_attention_mask=False, return_token_type_ids=False, verbose=False)
        ids, lengths = _flatten(batch["input_ids"])
        starts = np.fromiter(chain.from_iterable(chain.from_iterable(batch["offset_mapping"])), dtype=np.int64,
                             count=2 * len(ids)).reshape(-1, 2)[:, 0]
        spans = _Spans(all_segments)
        return TokenBatch(ids, spans.inside(starts + np.repeat(spans.record_starts, lengths)), lengths)

    def _encode_by_segment(self, all_segments: list[Segments]) -> TokenBatch:
        flat = [text for segments in all_segments for text, _ in segments]
        pieces = self.tokenizer(flat, add_special_tokens=False, verbose=False)["input_ids"] if flat else []
        ids, piece_lengths = _flatten(pieces)
        flags = np.fromiter((train for segments in all_segments for _, train in segments), dtype=bool, count=len(flat))
        per_record = np.fromiter((len(segments) for segments in all_segments), dtype=np.int64,
                                 count=len(all_segments))
        record = np.repeat(np.arange(len(all_segments)), per_record)
        lengths = np.bincount(record, weights=piece_lengths, minlength=len(all_segments)).astype(np.int64)
        return TokenBatch(ids, np.repeat(flags, piece_lengths), lengths)

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


def _cut(prompts: list[str], fulls: list[str], where: str) -> Segments:
    """The segments of a conversation from the renders of each prefix before an assistant turn (`prompts`, ending
    with the generation prompt) and with it (`fulls`)."""
    segments: Segments = []
    done = ""
    for prompt, full in zip(prompts, fulls):
        done = _append_turn(segments, done, prompt, full, where)
    return segments


def _append_turn(segments: Segments, done: str, prompt: str, full: str, where: str) -> str:
    """Append one assistant turn's prompt and response segments, given the text rendered so far (`done`), the
    render up to the turn's generation prompt and the render with the turn; returns the new text rendered so far."""
    if not prompt.startswith(done) or not full.startswith(prompt):
        raise InputError(
            f"{where}: the tokenizer's chat template does not render this conversation incrementally "
            "(a prefix of the conversation does not render to a prefix of the whole), so the prompt "
            "cannot be masked exactly; use a tokenizer whose template appends turns"
        )
    segments.append((prompt[len(done):], False))
    segments.append((full[len(prompt):], True))
    return full


class _Spans:
    """The response segments of many texts as [start, end) pairs of character positions in the texts laid end to
    end, one position apart (so that a token at the very end of one text is never counted in the next)."""

    def __init__(self, all_segments: list[Segments]):
        bounds: list[int] = []  # [start0, end0, start1, end1, ...], ascending
        starts = []
        pos = 0
        for segments in all_segments:
            starts.append(pos)
            for text, train in segments:
                if train:
                    bounds += [pos, pos + len(text)]
                pos += len(text)
            pos += 1
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.record_starts = np.asarray(starts, dtype=np.int64)

    def inside(self, token_starts: np.ndarray) -> np.ndarray:
        """Per token (by where it starts): does it start inside a response segment?"""
        return np.searchsorted(self.bounds, token_starts, side="right") % 2 == 1


def _flatten(id_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of many sequences concatenated (int32), and each sequence's length."""
    lengths = np.fromiter((len(x) for x in id_lists), dtype=np.int64, count=len(id_lists))
    ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum()))
    return ids, lengths
