"""Record formats, rendering and the response-token mask, checked token by token."""

import json
from pathlib import Path

import pytest

from scalebio_cli.data.read.records import Turn, detect_format, iter_examples
from scalebio_cli.data.tokens.render import Renderer
from scalebio_cli.data.tokens.tokenized import load_tokenized
from scalebio_cli.errors import InputError


def expected(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Hand-written prompt/response texts, tokenized independently of render.py."""
    ids, mask = [], []
    for text, train in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [train] * len(piece)
    return ids, mask


def encode_file(tmp_path: Path, tokenizer, name: str, content: str, max_length: int = 512):
    path = tmp_path / name
    path.write_text(content)
    (where, example), = list(iter_examples(path))
    return Renderer(tokenizer, max_length).encode(example, where)


def check(tokenizer, enc, segments):
    ids, mask = expected(tokenizer, segments)
    assert enc.input_ids == ids
    # Token by token: every token is trainable exactly when it belongs to a response segment.
    rendered = [(tokenizer.decode([t]), m) for t, m in zip(enc.input_ids, enc.trainable)]
    assert rendered == [(tokenizer.decode([t]), m) for t, m in zip(ids, mask)]
    assert "".join(text for text, m in rendered if m) == "".join(t for t, train in segments if train)
    assert "".join(text for text, m in rendered if not m) == "".join(t for t, train in segments if not train)


def test_messages_multi_turn_with_system(tmp_path: Path, tokenizer) -> None:
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                           {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
                           {"role": "assistant", "content": "8"}]}
    enc = encode_file(tmp_path, tokenizer, "m.jsonl", json.dumps(record) + "\n")
    check(tokenizer, enc, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("5<|im_end|>\n", True),
        ("<|im_start|>user\nAnd 4 + 4?<|im_end|>\n<|im_start|>assistant\n", False),
        ("8<|im_end|>\n", True),
    ])


@pytest.mark.parametrize("key", ["conversations", "items"])
def test_sharegpt(tmp_path: Path, tokenizer, key: str) -> None:
    record = {key: [{"from": "human", "value": "Reverse: a b"}, {"from": "gpt", "value": "b a"}]}
    enc = encode_file(tmp_path, tokenizer, "s.json", json.dumps([record]))
    check(tokenizer, enc, [("<|im_start|>user\nReverse: a b<|im_end|>\n<|im_start|>assistant\n", False),
                           ("b a<|im_end|>\n", True)])


def test_alpaca_with_input(tmp_path: Path, tokenizer) -> None:
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    enc = encode_file(tmp_path, tokenizer, "a.jsonl", json.dumps(record) + "\n")
    check(tokenizer, enc, [("<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n", False),
                           ("5<|im_end|>\n", True)])


def test_prompt_completion_parquet(tmp_path: Path, tokenizer) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Say hi", "completion": "hi"}]), path)
    (where, example), = list(iter_examples(path))
    assert where == f"{path} row 0"
    enc = Renderer(tokenizer, 512).encode(example, where)
    check(tokenizer, enc, [("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n", False),
                           ("hi<|im_end|>\n", True)])


def test_text_trains_on_every_token_but_bos(tmp_path: Path, tokenizer) -> None:
    enc = encode_file(tmp_path, tokenizer, "t.jsonl", json.dumps({"text": "apple river stone"}) + "\n")
    check(tokenizer, enc, [("<s>", False), ("apple river stone</s>", True)])


def test_plain_layout_without_chat_template(tmp_path: Path, tokenizer) -> None:
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    record = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}
    enc = encode_file(tmp_path, plain, "m.jsonl", json.dumps(record) + "\n")
    check(plain, enc, [("<s>User: What is 2 + 3?\n\nAssistant:", False), (" 5</s>", True)])


RECORDS = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
                              {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
                              {"role": "assistant", "content": " 8, I think."}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Reverse: a b"}, {"from": "gpt", "value": "b a"}]},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    "prompt_completion": {"prompt": "Say hi ", "completion": " hi"},
    "text": {"text": "apple river stone"},
}


@pytest.mark.parametrize("template", [True, False])
@pytest.mark.parametrize("fmt", list(RECORDS))
def test_tokens_are_the_tokenization_of_the_whole_text(tmp_path: Path, tokenizer, fmt: str, template: bool) -> None:
    """No unnatural split at a prompt/response boundary: the rendered tokens equal tokenizer(the whole text), and
    the trainable tokens decode to the response segments."""
    tok = tokenizer if template else tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    if not template:
        tok.chat_template = None
    enc = encode_file(tmp_path, tok, "r.jsonl", json.dumps(RECORDS[fmt]) + "\n")
    renderer = Renderer(tok, 512)
    (where, example), = list(iter_examples(tmp_path / "r.jsonl"))
    segments = [(t, train) for t, train in renderer.segments(example, where) if t]
    whole = "".join(t for t, _ in segments)
    assert enc.input_ids == tok(whole, add_special_tokens=False)["input_ids"]
    assert tok.decode([t for t, m in zip(enc.input_ids, enc.trainable) if m]) == "".join(
        t for t, train in segments if train)


def test_plain_prompt_for_generation_keeps_earlier_replies(tokenizer) -> None:
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    turns = [Turn("user", "Q1"), Turn("assistant", "A1"), Turn("user", "Q2"), Turn("assistant", "A2")]
    prompt = plain.decode(Renderer(plain, 512).encode_prompt(turns))
    assert prompt == "<s>User: Q1\n\nAssistant: A1</s>\n\nUser: Q2\n\nAssistant:"
    full = Renderer(plain, 512).encode(turns)
    assert full.input_ids[: len(Renderer(plain, 512).encode_prompt(turns))] == Renderer(plain, 512).encode_prompt(
        turns)  # the generation prompt is a prefix of the trained sequence: inference sees what training saw


def test_truncation_and_skipped_records(tmp_path: Path, tokenizer) -> None:
    long_prompt = "apple " * 80
    records = [{"prompt": long_prompt, "completion": "5"}, {"prompt": "What is 1 + 1?", "completion": "2"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = load_tokenized(path, Renderer(tokenizer, max_length=32), cache_dir=tmp_path / "cache")
    assert data.num_records == 2 and len(data) == 1 and data.num_skipped == 1
    assert data.num_truncated == 1 and data.full_lengths[0] > 32  # the skipped record was cut, and is counted
    assert data.record_index.tolist() == [1]
    assert all(length <= 32 for length in data.lengths)
    again = load_tokenized(path, Renderer(tokenizer, max_length=32), cache_dir=tmp_path / "cache")
    assert again.from_cache and again.ids.tolist() == data.ids.tolist() and again.num_truncated == 1
    different_length = load_tokenized(path, Renderer(tokenizer, max_length=48), cache_dir=tmp_path / "cache")
    assert not different_length.from_cache  # max_length is part of the cache key


def test_conversation_without_assistant_turn_is_skipped(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    data = load_tokenized(path, Renderer(tokenizer, 64), cache_dir=tmp_path / "cache")
    assert len(data) == 0 and data.num_skipped == 1


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", '{"text": "ok"}\n{"prompt": "p"}\n', "bad.jsonl:2: unknown record format"),
    ("bad.jsonl", '{"foo": 1}\n', "bad.jsonl:1: unknown record format"),
    ("bad.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n', "unknown role 'robot'"),
    ("bad.jsonl", '{"messages": [{"role": "user"}]}\n', "messages[0] must be an object with 'role' and 'content'"),
    ("bad.jsonl", '{"text": 5}\n', "'text' must be a string"),
    ("bad.json", '{"text": "not a list"}', "must hold a list of records"),
    ("bad.json", '[{"text": "a"}, {"text": "b"} {"text": "c"}]', r"bad.json\[2\]: expected ',' or ']'"),
    ("bad.json", '[{"text": "a"}, {"text": ', r"bad.json\[1\]: not valid JSON"),
    ("bad.csv", "text\nhello\n", "unsupported file type '.csv'"),
])
def test_malformed_files_name_file_and_record(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=message.replace("[", r"\[") if "\\" not in message else message):
        list(iter_examples(path))


def test_formats_may_mix_within_a_file(tmp_path: Path) -> None:
    """`scalebio sample` writes records of several formats into one file."""
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c", "source": "a"}) + "\n"
                    + json.dumps({"text": "t", "source": "b"}) + "\n")
    assert [ex for _, ex in iter_examples(path)] == [[Turn("user", "p"), Turn("assistant", "c")], "t"]


def test_json_array_streams_across_chunks(tmp_path: Path) -> None:
    from scalebio_cli.data.read.records import _iter_json_array

    records = [{"text": f"record {i} " + "x" * (i % 50)} for i in range(300)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(records, indent=2))
    got = [r for _, r in _iter_json_array(path, chunk_size=64)]
    assert got == records


def test_formats_detected() -> None:
    cases = {"messages": {"messages": []}, "sharegpt": {"items": []}, "alpaca": {"instruction": "", "output": ""},
             "prompt_completion": {"prompt": "", "completion": ""}, "text": {"text": ""}, None: {"question": "q"}}
    for fmt, record in cases.items():
        assert detect_format(record) == fmt


def test_encode_prompt_ends_with_generation_prompt(tokenizer) -> None:
    turns = [Turn("user", "What is 2 + 3?"), Turn("assistant", "5")]
    ids = Renderer(tokenizer, 64).encode_prompt(turns)
    assert tokenizer.decode(ids) == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"


def test_truncation_warning_names_the_source_and_a_max_length_that_fits(tmp_path: Path, tokenizer) -> None:
    from scalebio_cli.data.tokens.tokenized import load_all

    records = [{"prompt": "What is 1 + 1?", "completion": "2 " * (40 if i % 10 == 0 else 2)} for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    warnings, logs = [], []
    (data,) = load_all([("data.sources.long", str(path))], Renderer(tokenizer, max_length=32), tmp_path / "cache",
                       log=logs.append, warn=warnings.append)
    assert data.num_truncated == 4  # 10% of the records
    assert "4 truncated at max_length 32" in logs[0]
    (warning,) = warnings
    assert warning.startswith("data.sources.long: 10.0% of the records (4 of 40)")
    assert f"data.max_length={data.length_covering(0.99)} keeps 99%" in warning
    assert data.length_covering(0.99) > 32
    short = load_all([("data.sources.short", str(path))], Renderer(tokenizer, max_length=128), tmp_path / "cache",
                     warn=warnings.append)
    assert short[0].num_truncated == 0 and len(warnings) == 1  # nothing cut: no warning
