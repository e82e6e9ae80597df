"""AsciiBpe gives exactly the Rust tokenizer's ids, on every tokenizer layout it accepts, and refuses the rest.

The reference is the Rust tokenizer itself (`encode_batch(..., add_special_tokens=False)`), on seeded random
plain-ASCII text built to stress the pre-tokenizer regexes (whitespace runs before words and at the ends,
contractions in both cases, digit runs, punctuation runs, special tokens inside words), on real instruct-math text
where present, and on SmolLM2's tokenizer where present.
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from conftest import INSTRUCT_MATH, SMOLLM2
from scalebio_cli.data import ascii_bpe
from scalebio_cli.data.ascii_bpe import GPT2_PATTERN, AsciiBpe, ascii_pattern

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
SPECIALS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|im"]  # "<|im": a prefix of two others
PIECES = [" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n ", "'s", "'S", "'ll", "'RE", "'d", "don't", "I'M", "x",
          "Hello", "hello", "WORLD", "a1b2", "2024", "3.14159", "1234567", "(1+2)", "=", "...", "!!", "?", "$x^2$",
          "\\frac{1}{2}", "--", "_", "{y}", "`code`", "\"q\"", "@", "~", "|", "<", ">", "<|", "|>", *SPECIALS]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def corpus() -> list[str]:
    texts = random_texts(400, seed=1)
    for f in sorted(INSTRUCT_MATH.glob("train_*.json"))[:3]:
        texts += [t["value"] for r in json.loads(f.read_text(encoding="utf-8"))[:150] for t in r["items"]]
    return texts


def train(pre_tokenizer, normalizer=None, special: list[AddedToken] | None = None, added=()) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special or list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if added:
        tok.add_tokens(list(added))
    return tok


def split_then_bytes(pattern: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


LAYOUTS = {
    "bytelevel-gpt2": lambda: train(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "split-llama3": lambda: train(split_then_bytes(LLAMA3)),
    "split-qwen2": lambda: train(split_then_bytes(QWEN2)),
    # an added (normalized, not special) token that overlaps a special one: matched in the second pass
    "added-normalized": lambda: train(pre_tokenizers.ByteLevel(add_prefix_space=False), added=["im_st", "Hel"]),
}


def rust_ids(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_rust_tokenizers_ids_on_every_accepted_layout(layout: str) -> None:
    tok = LAYOUTS[layout]()
    fast = AsciiBpe.for_backend(tok)
    assert fast is not None
    texts = corpus() + random_texts(2000, seed=2)
    plain = [t for t in texts if ascii_bpe.PLAIN_TEXT.fullmatch(t)]
    assert len(plain) > 2000
    assert [fast.encode(t) for t in plain] == rust_ids(tok, plain)


def test_smollm2() -> None:
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"the SmolLM2-135M-Instruct tokenizer is not at {SMOLLM2}")
    tok = Tokenizer.from_file(str(SMOLLM2 / "tokenizer.json"))
    fast = AsciiBpe.for_backend(tok)
    assert fast is not None
    texts = [t for t in corpus() + random_texts(2000, seed=3) if ascii_bpe.PLAIN_TEXT.fullmatch(t)]
    assert [fast.encode(t) for t in texts] == rust_ids(tok, texts)


def test_other_text_goes_to_the_rust_tokenizer_in_order() -> None:
    tok = LAYOUTS["bytelevel-gpt2"]()
    fast = AsciiBpe.for_backend(tok)
    sent: list[str] = []

    def rust(texts: list[str]) -> list[list[int]]:
        sent.extend(texts)
        return rust_ids(tok, texts)

    texts = ["plain text", "caf\u00e9", "tab\tand\r\nCRLF", "vertical\x0btab", "\u03c0 r^2", "x"]
    assert fast.encode_many(texts, rust) == rust_ids(tok, texts)
    assert sent == ["caf\u00e9", "vertical\x0btab", "\u03c0 r^2"]


@pytest.mark.parametrize("why", ["normalizer", "prefix-space", "metaspace", "digits", "unknown-escape", "lstrip"])
def test_refuses_what_it_does_not_handle(why: str) -> None:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = {
        "normalizer": lambda: train(byte_level, normalizer=normalizers.NFKC()),
        "prefix-space": lambda: train(pre_tokenizers.ByteLevel(add_prefix_space=True)),
        "metaspace": lambda: train(pre_tokenizers.Metaspace()),
        "digits": lambda: train(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])),
        "unknown-escape": lambda: train(split_then_bytes(r"\w+|\s+|[^\w\s]+")),
        "lstrip": lambda: train(byte_level, special=[AddedToken("<s>", lstrip=True, special=True)]),
    }[why]()
    assert AsciiBpe.for_backend(tok) is None


def test_a_wrong_translation_is_caught_by_the_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `(?!\\S)` the whitespace before a word would be cut differently: the probes see it and the encoder
    is not used."""
    tok = LAYOUTS["bytelevel-gpt2"]()
    real = ascii_bpe.ascii_pattern
    monkeypatch.setattr(ascii_bpe, "ascii_pattern", lambda p: real(p.replace(r"\s+(?!\S)|", "")))
    assert AsciiBpe.for_backend(tok) is None


def test_ascii_translation() -> None:
    assert ascii_pattern(GPT2_PATTERN) == (r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^ \t\n\rA-Za-z0-9]+"
                                           r"|[ \t\n\r]+(?![^ \t\n\r])|[ \t\n\r]+")
    assert ascii_pattern(r"[^\r\n\p{L}]?\p{L}+") == r"[^\r\nA-Za-z]?[A-Za-z]+"
    assert ascii_pattern(r"[]a]|x") == r"[\]a]|x"
    for untranslatable in (r"\d+", r"\p{Lu}", r"[^\S]", r"\x41", r"[a[b]]", r"\s+$", r"^a"):
        assert ascii_pattern(untranslatable) is None


def test_renderer_uses_it_and_the_switch_turns_it_off(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    from scalebio_cli.data.render import Renderer

    examples = [([("user", "What is 2 + 2?")], "It is 4."), ([("user", "\u03c0?")], "About 3.14.")]
    from scalebio_cli.data.records import Turn

    items = [([Turn(r, c) for r, c in turns] + [Turn("assistant", a)], f"r{i}") for i, (turns, a) in
             enumerate(examples)]
    fast = Renderer(tokenizer, 64)
    assert fast._ascii_bpe is not None
    monkeypatch.setenv("SCALEBIO_RUST_TOKENIZER", "1")
    rust = Renderer(tokenizer, 64)
    assert rust._ascii_bpe is None
    a, b = fast.encode_batch(items), rust.encode_batch(items)
    assert a.ids.tolist() == b.ids.tolist() and a.trainable.tolist() == b.trainable.tolist()
