"""Byte-level BPE of plain-ASCII text in Python: the Rust tokenizer's token ids, in about a third of its time.

Why hand-written (measured, scripts/bench_data.py): on instruct-math chat records the Rust tokenizer
(`tokenizers` 0.23, SmolLM2's byte-level BPE) takes 300-450 us per record, and nearly all of it goes to per-word
bookkeeping (a normalized string with per-byte alignments for every word, token strings, offsets), not to BPE: a
whitespace pre-tokenizer instead of its regex saves almost nothing, and with every word cached it still takes
~270 us. Python's `re` cuts the same words in ~60 us, a dict maps each word to its ids, and only a word not seen
yet goes to the Rust BPE model itself (`model.tokenize`, the call the Rust pipeline makes per word). Tokenization
is ~80% of cold preparation, so this is what takes preparation past 5,000 records/s on 2 cores.

The Rust tokenizer stays the reference, and everything this module is not sure of goes to it:
- tokenizers: a BPE model with no normalizer, pre-tokenized by ByteLevel (GPT-2's regex, no prefix space) or by
  one Split regex (isolated matches) then ByteLevel without a regex (Llama-3, Qwen2), special tokens that strip
  nothing and are matched as written;
- texts: printable ASCII, tab, newline and carriage return only. There, the regex's Unicode classes are plain
  ASCII sets (`\\p{L}` = `[A-Za-z]`, `\\p{N}` = `[0-9]`, `\\s` = `[ \\t\\n\\r]`), so `re` and the Rust tokenizer's
  regex engine cannot disagree about a character class; any other character sends the text to the Rust tokenizer;
- the ASCII translation of the pattern is checked against the Rust tokenizer on probe strings (every printable
  character in several contexts, every short mix of whitespace, letters, digits and punctuation, contractions,
  special tokens) when the encoder is built: one difference and the encoder is not used at all.
"""

from __future__ import annotations

import itertools
import re
import string
from collections.abc import Callable
from typing import Any

from scalebio_cli.data.tokenizer_spec import component_spec, plain_bpe, spec_pieces

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel's regex
PLAIN_TEXT = re.compile(r"[\x20-\x7e\t\n\r]*")  # the texts this module tokenizes (fullmatch)
WHITESPACE = " \\t\\n\\r"  # \s on PLAIN_TEXT, written for a character class
# Each class escape on PLAIN_TEXT, inside a character class and outside one (None: it cannot be written inside).
CLASS_ESCAPES = {"p{L}": ("A-Za-z", "[A-Za-z]"), "p{N}": ("0-9", "[0-9]"), "s": (WHITESPACE, f"[{WHITESPACE}]"),
                 "S": (None, f"[^{WHITESPACE}]")}
MAX_WORDS = 300_000  # words remembered (~200 bytes each); past this, a new word is merged each time it comes


def ascii_pattern(pattern: str) -> str | None:
    """`pattern` (the Rust tokenizer's regex syntax) as a Python `re` pattern that cuts PLAIN_TEXT the same way,
    or None where it uses anything not known to mean the same on ASCII in both engines (other escapes, nested
    character classes)."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            escape = next((e for e in CLASS_ESCAPES if pattern.startswith(e, i + 1)), None)
            if escape is not None:
                inside, outside = CLASS_ESCAPES[escape]
                if in_class and inside is None:
                    return None
                out.append(inside if in_class else outside)
                i += 1 + len(escape)
                continue
            following = pattern[i + 1: i + 2]
            if following.isalnum() and following not in "rnt":  # \d \w \b \x.. \p{..} \u..: not translated
                return None
            out.append(pattern[i: i + 2])
            i += 2
            continue
        if c == "[":
            if in_class:  # a nested set (onig syntax): not translated
                return None
            in_class = True
            out.append(c)
            i += 1
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):  # a literal ] first in the class
                out.append("\\]")
                i += 1
            continue
        if c == "]" and in_class:
            in_class = False
        if c in "^$" and not in_class:  # anchors: Python's $ also matches before a final newline
            return None
        out.append(c)
        i += 1
    return "".join(out)


def _word_pattern(backend: Any) -> str | None:
    """The regex that cuts a text into words before BPE, for the two pre-tokenizer layouts this module handles."""
    pieces = spec_pieces(component_spec(backend.pre_tokenizer), "pretokenizers")
    if pieces and pieces[-1].get("type") == "ByteLevel" and not pieces[-1].get("add_prefix_space"):
        if len(pieces) == 1 and pieces[0].get("use_regex", True):
            return GPT2_PATTERN
        split = pieces[0]
        if (len(pieces) == 2 and not pieces[1].get("use_regex", True) and split.get("type") == "Split"
                and split.get("behavior") == "Isolated" and not split.get("invert")
                and "Regex" in split.get("pattern", {})):
            return split["pattern"]["Regex"]
    return None


def _alternation(contents: list[str]) -> re.Pattern[str] | None:
    """Splits a text at these strings, the longest first where several start at one place (the Rust tokenizer
    matches added tokens leftmost-longest), keeping them (a capturing group)."""
    if not contents:
        return None
    return re.compile("(" + "|".join(re.escape(c) for c in sorted(contents, key=len, reverse=True)) + ")")


class AsciiBpe:
    """Token ids of plain-ASCII texts, exactly as the Rust tokenizer `backend` gives them with
    add_special_tokens=False. Build it with `for_backend`, which returns None where that cannot be promised."""

    def __init__(self, backend: Any, words: re.Pattern[str], added: list[tuple[re.Pattern[str] | None, dict]]):
        self._model = backend.model
        self._words = words
        self._added = added  # (splitter, content -> id): tokens matched as written, then those matched normalized
        # What ByteLevel writes for each ASCII byte (from the library itself: the vocabulary is in these characters)
        from tokenizers.pre_tokenizers import ByteLevel

        byte_level = ByteLevel(add_prefix_space=False, use_regex=False)
        self._bytes = str.maketrans({chr(b): byte_level.pre_tokenize_str(chr(b))[0][0] for b in range(128)})
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def for_backend(cls, backend: Any) -> AsciiBpe | None:
        """The encoder for a Rust tokenizer, or None where this module does not handle that tokenizer or where
        it gives one token differently from the Rust tokenizer on the probe strings."""
        if not plain_bpe(backend) or getattr(backend, "encode_special_tokens", False):
            return None
        pattern = _word_pattern(backend)
        translated = ascii_pattern(pattern) if pattern is not None else None
        if translated is None:
            return None
        try:
            words = re.compile(translated)
        except re.error:  # e.g. possessive quantifiers before Python 3.11
            return None
        if words.groups or words.match("") is not None:  # findall would return groups; empty words never end
            return None
        tokens = backend.get_added_tokens_decoder()
        if any(t.single_word for t in tokens.values()):  # (plain_bpe: none strips whitespace)
            return None
        added = []
        for normalized in (False, True):
            ids = {t.content: i for i, t in tokens.items() if t.content and bool(t.normalized) == normalized}
            added.append((_alternation(list(ids)), ids))
        encoder = cls(backend, words, added)
        probes = probe_texts([t.content for t in tokens.values() if PLAIN_TEXT.fullmatch(t.content)])
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        try:
            reference = [e.ids for e in encode(probes, add_special_tokens=False)]
            if any(encoder.encode(text) != ids for text, ids in zip(probes, reference)):
                return None
        except Exception:  # a tokenizer that fails on a probe is left to the Rust tokenizer entirely
            return None
        encoder._cache.clear()  # the probes' words are no use to real text
        return encoder

    def encode_many(self, texts: list[str], rust: Callable[[list[str]], list[list[int]]]) -> list[list[int]]:
        """Token ids of each text: plain-ASCII ones here, the others in one call of `rust` (in order)."""
        out: list[list[int] | None] = [self.encode(t) if PLAIN_TEXT.fullmatch(t) else None for t in texts]
        rest = [i for i, ids in enumerate(out) if ids is None]
        if rest:
            for i, ids in zip(rest, rust([texts[i] for i in rest])):
                out[i] = ids
        return out  # type: ignore[return-value]

    def encode(self, text: str) -> list[int]:
        """A plain-ASCII text's token ids: added tokens first (as written, then normalized: no normalizer, so the
        same text), then the words between them, each through BPE."""
        ids: list[int] = []
        self._encode_added(text, 0, ids)
        return ids

    def _encode_added(self, text: str, level: int, ids: list[int]) -> None:
        if level == len(self._added):
            self._encode_words(text, ids)
            return
        splitter, contents = self._added[level]
        if splitter is None:
            self._encode_added(text, level + 1, ids)
            return
        for k, piece in enumerate(splitter.split(text)):
            if k % 2:  # the captured token
                ids.append(contents[piece])
            elif piece:
                self._encode_added(piece, level + 1, ids)

    def _encode_words(self, text: str, ids: list[int]) -> None:
        words = self._words.findall(text)
        if sum(map(len, words)) != len(text):  # the pattern left text between matches: a word of its own
            words = self._words_with_gaps(text)
        cache = self._cache
        for word in words:
            known = cache.get(word)
            if known is None:
                known = [t.id for t in self._model.tokenize(word.translate(self._bytes))]
                if len(cache) < MAX_WORDS:
                    cache[word] = known
            ids += known

    def _words_with_gaps(self, text: str) -> list[str]:
        """Matches and the text between them, in order (a Split with isolated matches keeps both)."""
        words, at = [], 0
        for match in self._words.finditer(text):
            if match.start() > at:
                words.append(text[at: match.start()])
            words.append(match.group())
            at = match.end()
        if at < len(text):
            words.append(text[at:])
        return words


def probe_texts(added: list[str]) -> list[str]:
    """Strings on which a wrong translation of a pre-tokenizer regex shows: every printable ASCII character alone
    and next to letters, digits, spaces and newlines; every string of up to three characters over whitespace,
    letters, digits, an apostrophe and punctuation, and of four over whitespace, `s`, `'` and `.`; contractions in
    both cases; runs of digits and spaces; the added tokens inside and next to text."""
    chars = string.printable[:-2]  # without \x0b\x0c: PLAIN_TEXT's alphabet
    probes = list(chars)
    for c in chars:
        probes += [f"a{c}b", f" {c}", f"  {c}x", f"{c}{c}{c}", f"1{c}2", f"\n{c}", f"{c}\n", f"{c} a", f"x {c}{c} y"]
    for mix, longest in ((" \t\n\rAz9'.-", 3), (" \n\rs'.", 4)):  # ~2,800 strings: ~40 ms, once per process
        for n in range(2, longest + 1):
            probes += ["".join(p) for p in itertools.product(mix, repeat=n)]
    probes += ["it's I'M we'll they'RE you've I'd can't 'S 'T 'Ll", "1234567 89 0", "a" * 40 + " " * 9 + "b",
               "x\r\n\r\n  y\n\n\n z", "   \n\t  ", "Hello, World! (1+2)=3; {x: [y]}? @#$%^&*_~`|\\\"<>/"]
    for token in added:
        probes += [token, f"{token}{token}", f"a{token}b", f" {token} ", f"\n{token}user\nhi{token}\n", token[:-1]]
    return probes
