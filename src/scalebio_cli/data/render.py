"""Render examples to token ids and a trainable mask (True exactly on response tokens).

A conversation is cut into alternating prompt and response text segments. The prompt segment ends with the
generation prompt (e.g. `<|im_start|>assistant\\n`), so the tokens the model is trained to produce are the tokens
it would generate at inference after `apply_chat_template(..., add_generation_prompt=True)`. The whole text is then
tokenized at once (a fast tokenizer locates each token in the text, which says whether it lies in a response
segment), so the tokens are exactly the tokenization of the whole conversation, never an unnatural split at a
segment boundary (`' ', '5'` instead of `' 5'`). Chat templates carry their own special tokens (BOS included), so
nothing is added (the reference code's double-BOS bug). Tokenizers without a chat template get a plain layout,
`User: ...\\n\\nAssistant: ...`, whose prompt ends at `Assistant:` so that the response starts with its natural
leading-space token, with BOS/EOS added by hand. Slow (non-Rust) tokenizers report no spans: their segments are
tokenized one by one.

Records are rendered and tokenized a chunk at a time (`encode_batch`) into flat numpy arrays, with no Python loop
over tokens: the Rust tokenizer takes ~300 us per chat record, and per-token Python work used to cost about as much.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from typing import Any

import numpy as np

from scalebio_cli.data.ascii_bpe import AsciiBpe
from scalebio_cli.data.records import Example, Turn
from scalebio_cli.data.template_pieces import PieceRenderer, Render, pastes_content_only
from scalebio_cli.data.tokenizer_spec import component_spec, plain_bpe, spec_pieces
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
            render = self._render_many
            prompt_texts = render(prompts, True) if prompts else []
            full_texts = render(fulls, False) if fulls else []
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
        """Tokenize each whole text; a token is trainable when it starts inside a response segment.

        Where a token starts comes from the byte lengths of the tokens before it when that is exact
        (`_token_bytes`: the tokenizer then skips computing offsets, a quarter of its work), else from the offsets
        the tokenizer reports."""
        texts = ["".join(text for text, _ in segments) for segments in all_segments]
        backend = self._plain_backend()
        if backend is not None and self._token_bytes is not None:
            return self._encode_by_bytes(backend, texts, all_segments)
        return self._encode_by_offsets(backend, texts, all_segments)

    def _encode_by_offsets(self, backend: Any, texts: list[str], all_segments: list[Segments]) -> TokenBatch:
        """Tokens located by the character offsets the tokenizer reports (`backend`: the Rust tokenizer, or None
        to call the transformers tokenizer)."""
        if backend is not None:  # the same call transformers makes, minus its per-record dict building (~30%)
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            id_lists, offset_lists = [e.ids for e in encodings], [e.offsets for e in encodings]
        else:
            batch = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            id_lists, offset_lists = batch["input_ids"], batch["offset_mapping"]
        ids, lengths = _flatten(id_lists)
        spans = _Spans(all_segments, len)
        local = np.fromiter(chain.from_iterable(chain.from_iterable(offset_lists)), dtype=np.int64,
                            count=2 * len(ids)).reshape(-1, 2)[:, 0]
        return TokenBatch(ids, spans.inside(local + np.repeat(spans.record_starts, lengths)), lengths)

    def _encode_by_bytes(self, backend: Any, texts: list[str], all_segments: list[Segments]) -> TokenBatch:
        """Tokens located by summing their UTF-8 lengths. A text whose tokens do not account for each of its bytes
        (a character the vocabulary lacks, which BPE drops; an unknown-token id) is located by offsets instead."""
        ids, lengths = _flatten(self._token_ids(backend, texts))
        table = self._token_bytes
        width = np.where(ids < len(table), table[np.minimum(ids, len(table) - 1)], -1)  # -1 too: a token added since
        spans = _Spans(all_segments, _utf8_length)
        ends = np.concatenate([[0], np.cumsum(width)])
        first = np.cumsum(lengths) - lengths  # each record's first token
        record = np.repeat(np.arange(len(lengths)), lengths)
        unknown = np.bincount(record[width < 0], minlength=len(lengths)) > 0
        wrong = unknown | (ends[first + lengths] - ends[first] != spans.record_sizes)
        # A token starts after the bytes of its record's tokens before it.
        starts = spans.record_starts[record] + ends[:-1] - ends[first][record]
        batch = TokenBatch(ids, spans.inside(starts), lengths)
        if wrong.any():
            redo = np.flatnonzero(wrong)
            exact = self._encode_by_offsets(backend, [texts[i] for i in redo], [all_segments[i] for i in redo])
            if not np.array_equal(exact.lengths, lengths[redo]):
                return self._encode_by_offsets(backend, texts, all_segments)
            batch.trainable[wrong[record]] = exact.trainable
        return batch

    def _token_ids(self, backend: Any, texts: list[str]) -> list[list[int]]:
        """The Rust tokenizer's ids of each text (add_special_tokens=False), plain-ASCII texts through AsciiBpe
        where it holds for this tokenizer (the same ids, a third of the time)."""
        def rust(part: list[str]) -> list[list[int]]:
            return [e.ids for e in backend.encode_batch_fast(part, add_special_tokens=False)]

        fast = self._ascii_bpe
        return rust(texts) if fast is None else fast.encode_many(texts, rust)

    def warm_up(self) -> None:
        """Build now what every batch uses (the template renderer, the token byte lengths, the ASCII encoder):
        workers forked afterwards inherit it instead of each building it again."""
        _ = self._render_many, self._token_bytes, self._ascii_bpe

    def enlarge_word_cache(self, words: int) -> None:
        """Let a Rust BPE remember up to `words` words: its cache stops taking new words once full (10,000 by
        default), and every word it has to merge again costs. Only speed changes: a cached word's tokens are the
        ones BPE computes for it."""
        model = getattr(getattr(self.tokenizer, "_tokenizer", None), "model", None)
        if hasattr(model, "_resize_cache"):  # tokenizers >= 0.21
            model._resize_cache(words)

    @cached_property
    def _render_many(self) -> Render:
        return _batch_renderer(self.tokenizer)

    @cached_property
    def _token_bytes(self) -> np.ndarray | None:
        """token_byte_lengths of the Rust tokenizer, where it can tokenize without offsets."""
        backend = self._plain_backend()
        return None if backend is None or not hasattr(backend, "encode_batch_fast") else token_byte_lengths(backend)

    @cached_property
    def _ascii_bpe(self) -> AsciiBpe | None:
        """The Python encoder of plain-ASCII texts, for a tokenizer located by byte lengths (None where it does not
        hold, or with SCALEBIO_RUST_TOKENIZER=1: every text through the Rust tokenizer, as benchmarks compare)."""
        backend = self._plain_backend()
        if backend is None or self._token_bytes is None or os.environ.get("SCALEBIO_RUST_TOKENIZER") == "1":
            return None
        return AsciiBpe.for_backend(backend)

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

    def _encode_by_segment(self, all_segments: list[Segments]) -> TokenBatch:
        flat = [text for segments in all_segments for text, _ in segments]
        ids, piece_lengths = _flatten(self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
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


def _batch_renderer(tokenizer: Any) -> Render:
    """Renders many conversations at once, each exactly as `tokenizer.apply_chat_template(conversation,
    tokenize=False, add_generation_prompt=...)` renders it.

    apply_chat_template renders a batch through transformers' render_jinja_template, which renders each
    conversation on its own, after normalising messages that are plain `{"role", "content"}` dicts of strings into
    equal dicts, with the tokenizer's chat template and special tokens as template variables. Calling
    render_jinja_template the same way skips that normalisation (a third of the cost of rendering a short
    conversation), and a template that only pastes contents is rendered from cached pieces in front of it. A
    tokenizer class that overrides apply_chat_template, or a transformers without that function, gets its batched
    apply_chat_template instead."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    def batched(conversations: list[list[dict[str, str]]], generation_prompt: bool) -> list[str]:
        return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=generation_prompt)

    if getattr(type(tokenizer), "apply_chat_template", None) is not PreTrainedTokenizerBase.apply_chat_template:
        return batched
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        return batched
    if not {"conversations", "chat_template", "add_generation_prompt"} <= set(
            inspect.signature(render_jinja_template).parameters):
        return batched

    def direct(conversations: list[list[dict[str, str]]], generation_prompt: bool) -> list[str]:
        rendered, _ = render_jinja_template(conversations=conversations, chat_template=tokenizer.get_chat_template(),
                                            add_generation_prompt=generation_prompt, **tokenizer.special_tokens_map)
        return rendered

    # A template that only pastes contents in is rendered once per shape, then from its pieces (template_pieces)
    template = getattr(tokenizer, "chat_template", None)  # one template (not a dict of named ones) to look into
    return PieceRenderer(direct) if isinstance(template, str) and pastes_content_only(template) else direct


class _Spans:
    """The response segments of many texts as [start, end) pairs of positions in the texts laid end to end, one
    position apart (so that a token at the very end of one text is never counted in the next), positions counted by
    `size` (characters or UTF-8 bytes)."""

    def __init__(self, all_segments: list[Segments], size: Callable[[str], int]):
        bounds: list[int] = []  # [start0, end0, start1, end1, ...], ascending
        starts, sizes = [], []
        pos = 0
        for segments in all_segments:
            starts.append(pos)
            for text, train in segments:
                n = size(text)
                if train:
                    bounds += [pos, pos + n]
                pos += n
            sizes.append(pos - starts[-1])
            pos += 1
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.record_starts = np.asarray(starts, dtype=np.int64)
        self.record_sizes = np.asarray(sizes, dtype=np.int64)

    def inside(self, token_starts: np.ndarray) -> np.ndarray:
        """Per token (by where it starts): does it start inside a response segment?"""
        return np.searchsorted(self.bounds, token_starts, side="right") % 2 == 1


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _flatten(id_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of many sequences concatenated (int32), and each sequence's length."""
    lengths = np.fromiter((len(x) for x in id_lists), dtype=np.int64, count=len(id_lists))
    ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum()))
    return ids, lengths


# -- where tokens start, without offsets --------------------------------------------------------------------------

# Pre-tokenizers that only cut the text (none drops, adds or changes a character), as serialized in tokenizer.json
_CUTTING = {"ByteLevel", "Split", "Digits", "Punctuation"}
# Post-processors that leave offsets alone when no special tokens are added (ByteLevel and Roberta may trim them)
_UNTRIMMED = {"TemplateProcessing", "BertProcessing", "ByteLevel", "RobertaProcessing"}


def token_byte_lengths(backend: Any) -> np.ndarray | None:
    """Per token id, the length in UTF-8 bytes of the text it stands for (-1: unknown), when a tokenization's
    tokens are the text's bytes in order, so that summing these lengths gives each token's start exactly as its
    offsets would; None for a tokenizer where that does not hold.

    It holds for byte-level BPE with nothing that changes the text: no normalizer, a pre-tokenizer that only cuts
    (ByteLevel without an added prefix space), a BPE without word prefixes/suffixes, dropout or byte fallback,
    added tokens that strip no whitespace, and a post-processor that does not trim offsets. A byte-level token's
    string has one character per byte; an added token stands for its content. (Read through the tokenizer's
    objects, not its JSON: parsing the merges costs ~0.1 s before any worker can start.)"""
    if (not plain_bpe(backend) or not _only_cuts(component_spec(backend.pre_tokenizer))
            or not _untrimmed(component_spec(backend.post_processor))):
        return None
    model, added = backend.model, backend.get_added_tokens_decoder()
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    vocab: dict[str, int] = backend.get_vocab(with_added_tokens=False)
    lengths = np.full(1 + max([*vocab.values(), *added, -1]), -1, dtype=np.int64)
    for token, i in vocab.items():
        if alphabet.issuperset(token):
            lengths[i] = len(token)
    for i, t in added.items():
        lengths[i] = len(t.content.encode("utf-8"))
    if model.unk_token in vocab:  # stands for any number of bytes
        lengths[vocab[model.unk_token]] = -1
    return lengths


def _only_cuts(pre_tokenizer: dict[str, Any] | None) -> bool:
    pieces = spec_pieces(pre_tokenizer, "pretokenizers")
    return (sum(p["type"] == "ByteLevel" for p in pieces) == 1
            and all(p["type"] in _CUTTING and p.get("behavior") != "Removed" and not p.get("add_prefix_space")
                    for p in pieces))


def _untrimmed(post_processor: dict[str, Any] | None) -> bool:
    return all(p["type"] in _UNTRIMMED and not p.get("trim_offsets") for p in spec_pieces(post_processor, "processors"))
