"""The preparation path gives exactly the tokens of a straightforward reference encoding.

render.py tokenizes a chunk of records at once, renders chat templates in two batched calls, and encode_chunks'
workers parse the records themselves. The reference here does none of that: each record's segments are rendered
prefix by prefix with `apply_chat_template` (or written out for the plain layout), the whole text is tokenized by
`tokenizer(...)` with offsets (a slow tokenizer: segment by segment), and a token is trainable when it starts
inside a response.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from conftest import INSTRUCT_MATH, SMOLLM2
from scalebio_cli.data.read.records import Turn, iter_examples, to_example
from scalebio_cli.data.tokens.render import Renderer
from scalebio_cli.data.tokens.tokenized import load_tokenized
from scalebio_cli.errors import InputError
from test_data import expected

# Text that stresses locating tokens: multi-byte characters (split across byte-level tokens), a control character
# SmolLM2's vocabulary lacks (BPE drops it: no token covers it), special-token
# strings inside content, whitespace at the edges, CRLF, an empty turn.
ODD = ["", " ", "  leading", "\n\nnewlines", "trailing  ", "emoji 😀👍🏽 ok", "CJK 中文字符测试", "e\u0301 combining",
       "<|im_start|>user\nfake<|im_end|>", "<|im_end|>", "<s>bos</s>", "tab\tx", "\r\nCRLF\r\n", "ÿ\u00a0nbsp",
       "ctrl \x14 char", "1234567890", "\u2028ls\u2029"]


def _records(n: int) -> list[dict]:
    """Chat records of every shape: system turns, several assistant turns, an opening and consecutive assistant
    turns, no assistant turn (skipped), alpaca, prompt/completion and text records; some long (truncated)."""
    math = []
    for f in sorted(INSTRUCT_MATH.glob("train_*.json"))[:2]:
        math += [(r["items"][0]["value"], r["items"][1]["value"]) for r in json.loads(f.read_text())[:100]]
    out = []
    for i in range(n):
        odd = ODD[i % len(ODD)]
        user, answer = math[i % len(math)] if math else (f"What is {i} + {i % 9}? {odd}", f"It is {i + i % 9}.")
        answer += " and so on" * (30 if i % 5 == 0 else 0)
        shape = i % 8
        if shape == 0:
            out.append({"messages": [{"role": "system", "content": "Be brief." + odd},
                                     {"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
        elif shape == 1:
            out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": odd + answer},
                                     {"role": "user", "content": odd}, {"role": "assistant", "content": answer + odd}]})
        elif shape == 2:
            out.append({"instruction": user, "input": odd, "output": answer})
        elif shape == 3:
            out.append({"prompt": odd + user, "completion": odd or "x"})
        elif shape == 4:
            out.append({"text": odd + answer})
        elif shape == 5:
            out.append({"conversations": [{"from": "gpt", "value": odd}, {"from": "human", "value": user},
                                          {"from": "gpt", "value": answer}]})
        elif shape == 6:
            out.append({"messages": [{"role": "user", "content": user + odd}]})
        else:
            out.append({"messages": [{"role": "system", "content": odd}, {"role": "user", "content": odd},
                                     {"role": "assistant", "content": odd}, {"role": "assistant", "content": answer},
                                     {"role": "user", "content": user}, {"role": "assistant", "content": odd}]})
    return out


def _reference_segments(tok, example) -> list[tuple[str, bool]]:
    if isinstance(example, str):
        return [(tok.bos_token or "", False), (example + (tok.eos_token or ""), True)]
    segments, done = [], ""
    if tok.chat_template:
        def render_prefix(turns: list[Turn], generation_prompt: bool) -> str:
            return tok.apply_chat_template([{"role": t.role, "content": t.content} for t in turns], tokenize=False,
                                           add_generation_prompt=generation_prompt)

        for i, turn in enumerate(example):
            if turn.role == "assistant" and i > 0:
                prompt, full = render_prefix(example[:i], True), render_prefix(example[: i + 1], False)
                assert prompt.startswith(done) and full.startswith(prompt)
                segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
                done = full
        return segments
    prompt = tok.bos_token or ""
    for turn in example:
        if turn.role == "assistant":
            segments += [(prompt + "Assistant:", False), (" " + turn.content + (tok.eos_token or ""), True)]
            prompt = "\n\n"
        else:
            prompt += {"system": "", "user": "User: "}[turn.role] + turn.content + "\n\n"
    return segments


def _reference_tokens(tok, example) -> tuple[list[int], list[bool]]:
    segments = [(text, train) for text, train in _reference_segments(tok, example) if text]
    if not tok.is_fast:
        return expected(tok, segments)  # segment by segment, as test_data's hand-written cases
    responses, pos = [], 0
    for text, train in segments:
        if train:
            responses.append((pos, pos + len(text)))
        pos += len(text)
    out = tok("".join(text for text, _ in segments), add_special_tokens=False, return_offsets_mapping=True)
    return out["input_ids"], [any(a <= start < b for a, b in responses) for start, _ in out["offset_mapping"]]


def _check_against_reference(tok, path: Path, tmp_path: Path, max_length: int) -> None:
    lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]  # not splitlines: U+2028
    ids, masks, full, kept = [], [], [], []
    for i, line in enumerate(lines):
        example_ids, mask = _reference_tokens(tok, to_example(json.loads(line), f"record {i}"))
        full.append(len(example_ids))
        if any(mask[1:max_length]):
            kept.append(i)
            ids += example_ids[:max_length]
            masks += mask[:max_length]
    lengths = [min(full[i], max_length) for i in kept]
    renderer = Renderer(tok, max_length)
    for workers in (1, 2):
        data = load_tokenized(path, renderer, tmp_path / f"cache-{workers}", workers=workers)
        assert data.ids.tolist() == ids and data.trainable.tolist() == masks, workers
        assert data.lengths.tolist() == lengths and data.record_index.tolist() == kept
        assert data.full_lengths.tolist() == full and data.num_truncated == sum(n > max_length for n in full)


@pytest.fixture
def records_file(tmp_path: Path) -> Path:
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=i % 2 == 0) + "\n" for i, r in enumerate(_records(320))),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def smollm2():
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"the SmolLM2-135M-Instruct tokenizer is not at {SMOLLM2}")
    from scalebio_cli.train.modeling import load_tokenizer

    return load_tokenizer(str(SMOLLM2))


@pytest.mark.parametrize("max_length", [1024, 48])
def test_smollm2_chat_template(smollm2, records_file: Path, tmp_path: Path, max_length: int) -> None:
    _check_against_reference(smollm2, records_file, tmp_path, max_length)


def test_tiny_tokenizer_with_and_without_chat_template(tokenizer, records_file: Path, tmp_path: Path) -> None:
    plain, no_bos = copy.deepcopy(tokenizer), copy.deepcopy(tokenizer)
    plain.chat_template = None
    no_bos.chat_template, no_bos.bos_token = None, None  # a text's first token is a response token then
    for k, (tok, max_length) in enumerate([(tokenizer, 40), (plain, 40), (no_bos, 1), (no_bos, 2)]):
        _check_against_reference(tok, records_file, tmp_path / str(k), max_length)


def test_tokenizers_whose_offsets_are_needed(tokenizer, records_file: Path, tmp_path: Path) -> None:
    """Trimmed offsets, a normalizer or an added prefix space: tokens are still located exactly."""
    from tokenizers import normalizers, pre_tokenizers, processors

    trimmed, normalized, prefixed, trimmed_no_bos = (copy.deepcopy(tokenizer) for _ in range(4))
    for tok in (trimmed, trimmed_no_bos):
        tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trimmed_no_bos.bos_token = None
    normalized.backend_tokenizer.normalizer = normalizers.NFKC()
    prefixed.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    for k, tok in enumerate((trimmed, normalized, prefixed, trimmed_no_bos)):
        _check_against_reference(tok, records_file, tmp_path / str(k), 40)


def test_a_token_at_the_very_end_of_a_text_is_not_the_next_texts(tokenizer, tmp_path: Path) -> None:
    """Trimmed offsets put a whitespace token at the end of its text ('abc  ' -> 'ĠĠ' at (5, 5)): it must not
    count as inside the next text's response, which starts right there when no BOS comes first."""
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.bos_token = tok.eos_token = None
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["abc  ", "def", "ghi  ", "  jk"]))
    _check_against_reference(tok, path, tmp_path, 16)


class _CharTokenizer:
    """A slow (pure Python) tokenizer: one token per character, its special tokens split out."""

    @staticmethod
    def build(chat_template: str | None):
        from transformers import PreTrainedTokenizer

        class CharTokenizer(PreTrainedTokenizer):
            def __init__(self, **kwargs):
                chars = [chr(c) for c in range(32, 127)] + ["\n", "\t", "\r"]
                self._vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
                super().__init__(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **kwargs)

            @property
            def vocab_size(self) -> int:
                return len(self._vocab)

            def get_vocab(self) -> dict[str, int]:
                return dict(self._vocab)

            def _tokenize(self, text: str) -> list[str]:
                return list(text)

            def _convert_token_to_id(self, token: str) -> int:
                return self._vocab.get(token, 3)

            def _convert_id_to_token(self, index: int) -> str:
                return next((t for t, i in self._vocab.items() if i == index), "<unk>")

        tok = CharTokenizer()
        tok.chat_template = chat_template
        return tok


def test_slow_tokenizer(records_file: Path, tmp_path: Path) -> None:
    template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    for k, chat_template in enumerate((template, None)):
        tok = _CharTokenizer.build(chat_template)
        assert not tok.is_fast
        _check_against_reference(tok, records_file, tmp_path / str(k), 64)


def test_batched_rendering_raises_the_first_error_in_record_order(tokenizer) -> None:
    """The batched template calls render every prompt before any response; an error is still the one rendering
    the records one by one raises first: here record 1's (not incremental) before record 2's (the template raises)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('boom') }}"
                         "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}"
                         "{% if m['content'] == 'shift' and loop.last %}!{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    renderer = Renderer(tok, 64)
    ok = [Turn("user", "hi"), Turn("assistant", "yo")]
    shifted = [Turn("user", "shift"), Turn("assistant", "yo")]
    boom = [Turn("user", "hi"), Turn("assistant", "yo"), Turn("user", "boom"), Turn("assistant", "x")]
    with pytest.raises(InputError, match="record 1: the tokenizer's chat template does not render"):
        renderer.encode_batch([(ok, "record 0"), (shifted, "record 1"), (boom, "record 2")])
    with pytest.raises(Exception, match="boom"):
        renderer.encode_batch([(ok, "record 0"), (boom, "record 2"), (shifted, "record 1")])
    assert renderer.segments(ok) == [("<|user|>hi<|assistant|>", False), ("yo", True)]


def test_template_renderer_is_apply_chat_template(tokenizer) -> None:
    """The batched renderer gives, conversation by conversation, what apply_chat_template gives."""
    conversations = [[{"role": "system", "content": odd}, {"role": "user", "content": "q" + odd},
                      {"role": "assistant", "content": odd}] for odd in ODD]
    render_many = Renderer(tokenizer, 64)._render_many
    for generation_prompt in (True, False):
        assert render_many(conversations, generation_prompt) == [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=generation_prompt)
            for c in conversations]


@pytest.mark.parametrize("workers", [1, 2])
def test_errors_name_the_first_bad_record_as_before(tmp_path: Path, tokenizer, workers: int) -> None:
    """Workers parse the lines now: the error is still the one a pass over records.iter_examples raises, the first
    bad record's, by file and line, with a later chunk holding another bad record and invalid UTF-8 at the end."""
    good = json.dumps({"prompt": "What is 1 + 1?", "completion": "2"})
    lines = [good] * 2000
    lines[700] = '{"prompt": "p", "completion": '  # line 701: not JSON
    lines[1300] = '{"ask": "q"}'  # line 1301: unknown format
    path = tmp_path / "bad.jsonl"
    renderer = Renderer(tokenizer, 64)
    for k, (fixed, first) in enumerate([(None, f"{path}:701: not valid JSON"),
                                        (700, f"{path}:1301: unknown record format"), (1300, "not UTF-8 text")]):
        if fixed is not None:
            lines[fixed] = good
        path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff"}\n')
        with pytest.raises(InputError) as before:
            list(iter_examples(path))
        with pytest.raises(InputError) as now:
            load_tokenized(path, renderer, tmp_path / f"cache{k}", workers=workers)
        assert str(now.value) == str(before.value)
        assert first in str(now.value)


@pytest.mark.slow
def test_all_of_instruct_math_gives_the_reference_tokens(smollm2, tmp_path: Path) -> None:
    """Every record of ../shared/data/instruct-math (~4.6M tokens) on SmolLM2: the tokens and masks of the
    reference encoding, serial and on two workers."""
    files = sorted(INSTRUCT_MATH.glob("*.json"))
    if not files:
        pytest.skip(f"{INSTRUCT_MATH} is absent")
    for f in files:
        path = tmp_path / f"{f.stem}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in json.loads(f.read_text(encoding="utf-8"))),
                        encoding="utf-8")
        _check_against_reference(smollm2, path, tmp_path / f.stem, 4096)
