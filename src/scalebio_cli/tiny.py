"""Tiny models, tokenizers and demo data built locally in seconds (no model or dataset hub needed).

Used by `make demo` (scripts/build_demo.py) and by the tests. The demo data has a known right answer:

- `clean`:    arithmetic questions answered correctly and in full;
- `noisy`:    the same kind of questions with the answers replaced by "." (the paper's denoising setup);
- `offtopic`: a different task (reversing word lists), unrelated to the validation set;
- validation and test sets are drawn like `clean`.

ScaleBiO should give `clean` the largest weight and `noisy` the smallest.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = ("apple river stone cloud tiger lemon piano rocket garden silver window candle forest yellow "
         "button mirror orange planet castle bridge pencil winter summer dragon").split()


def arithmetic_qa(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    question = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."])
    return question.format(a=a, op=op, b=b), f"{a} {op} {b} = {result}. The answer is {result}."


def reverse_qa(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 6))
    return f"Reverse the list: {' '.join(words)}", " ".join(reversed(words))


def make_demo_data(out_dir: str | Path, per_source: int = 600, num_val: int = 200, num_test: int = 200,
                   noise: float = 1.0, seed: int = 0) -> dict[str, Path]:
    """Write the demo sources (three record formats, three file types), validation and test sets."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def messages(q: str, a: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    clean = [messages(*arithmetic_qa(rng)) for _ in range(per_source)]
    noisy = []
    for _ in range(per_source):
        q, a = arithmetic_qa(rng)
        noisy.append({"instruction": q, "input": "", "output": "." if rng.random() < noise else a})
    offtopic = [dict(zip(("prompt", "completion"), reverse_qa(rng))) for _ in range(per_source)]
    # Validation and test questions never appear in a source (in any phrasing): a leaked validation record would
    # make the source holding it look good for the wrong reason (`data/checks.py` would flag it).
    seen = {_question_key(r["messages"][1]["content"]) for r in clean}
    seen |= {_question_key(r["output"]) for r in noisy if r["output"] != "."}
    seen |= {_question_key(r["instruction"]) for r in noisy}
    val = [messages(*q) for q in _unseen_arithmetic(rng, num_val, seen)]
    test = [messages(*q) for q in _unseen_arithmetic(rng, num_test, seen)]

    paths = {name: out / f"{name}{ext}" for name, ext in
             [("clean", ".jsonl"), ("noisy", ".json"), ("offtopic", ".parquet"), ("val", ".jsonl"), ("test", ".jsonl")]}
    _write_jsonl(paths["clean"], clean)
    paths["noisy"].write_text(json.dumps(noisy, indent=1))
    _write_parquet(paths["offtopic"], offtopic)
    _write_jsonl(paths["val"], val)
    _write_jsonl(paths["test"], test)
    return paths


def _question_key(text: str) -> str:
    """The arithmetic a question or answer is about ("8 * 5"), whatever its phrasing."""
    import re

    match = re.search(r"(\d+) ([-+*]) (\d+)", text)
    return match.group(0) if match else text


def _unseen_arithmetic(rng: random.Random, n: int, seen: set[str]) -> list[tuple[str, str]]:
    """`n` arithmetic records about sums not in `seen` (added to it, so later calls stay disjoint too)."""
    out: list[tuple[str, str]] = []
    while len(out) < n:
        q, a = arithmetic_qa(rng)
        if _question_key(q) not in seen:
            seen.add(_question_key(q))
            out.append((q, a))
    return out


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _write_parquet(path: Path, records: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)


def corpus_texts(paths: list[Path]) -> list[str]:
    """Every string in the records of `paths`, to train a tokenizer on."""
    from scalebio_cli.data.read.records import iter_records

    texts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for path in paths:
        for _, record in iter_records(path):
            walk(record)
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 512, chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, with pad/bos/eos and (optionally) a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_model(tokenizer: Any, arch: str = "llama", layers: int = 4, hidden: int = 64, heads: int = 4,
                max_positions: int = 1024, seed: int = 0) -> Any:
    """A randomly initialised causal LM of the given architecture family, sized for CPU tests."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if arch == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions, **ids)
        return GPT2LMHeadModel(config)
    if arch == "gpt_neox":
        config = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=hidden * 4, max_position_embeddings=max_positions, **ids)
        return GPTNeoXForCausalLM(config)
    common = dict(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions, **ids)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    raise ValueError(f"unknown tiny architecture {arch!r}")


def save_tiny_model(out_dir: str | Path, texts: list[str], arch: str = "llama", layers: int = 4, hidden: int = 64,
                    vocab_size: int = 512, chat_template: str | None = CHAT_TEMPLATE, seed: int = 0) -> Path:
    """Build a tokenizer and a model and save both into one Hugging Face folder."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(texts, vocab_size, chat_template)
    model = build_model(tokenizer, arch, layers, hidden, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
