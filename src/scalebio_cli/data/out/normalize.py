"""One record schema for tools that read one: every record as `{"messages": [{"role", "content"}, ...]}`.

A file from several sources mixes messages, sharegpt, alpaca, prompt/completion and text records; LLaMA-Factory,
axolotl, TRL and `datasets` want one schema per dataset. records.py already turns each format into `Turn`s, so the
normalised record is exactly what scalebio itself trains on. A `text` record (loss on every token) becomes one
assistant turn with no prompt, the closest a chat schema comes to "train on all of it".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from scalebio_cli.data.read import sources as data_sources
from scalebio_cli.data.read.records import Example, Turn
from scalebio_cli.errors import InputError


def to_turns(example: Example) -> list[Turn]:
    return [Turn("assistant", example)] if isinstance(example, str) else list(example)


def to_messages(example: Example) -> list[dict[str, str]]:
    return [{"role": t.role, "content": t.content} for t in to_turns(example)]


def alternation_problem(turns: list[Turn]) -> str | None:
    """Why a conversation is not `[system] user assistant user assistant ...` (None if it is).

    LLaMA-Factory's sharegpt reader and NeMo's chat reader accept only that shape and skip other records with a
    warning, which would silently change the mixture a weights file asks for; exporters refuse them instead.
    """
    body = turns[1:] if turns and turns[0].role == "system" else turns
    if not body:
        return "it has no user/assistant turns"
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            return f"turn {i + 1 + (len(turns) - len(body))} is '{turn.role}' where '{expected}' must come"
    if body[-1].role != "assistant":
        return "it does not end with an assistant turn"
    return None


def iter_conversations(path: str | Path | data_sources.DataSource,
                       strict: bool = False) -> Iterator[tuple[str, list[Turn]]]:
    """Yield `(location, turns)` for every record of a file or source; `strict`: only alternating conversations
    (see alternation_problem), anything else an InputError naming the record."""
    source = path if isinstance(path, data_sources.DataSource) else data_sources.from_path(str(path), path)
    for where, example in data_sources.iter_examples(source):
        turns = to_turns(example)
        if strict:
            if isinstance(example, str):
                raise InputError(f"{where}: a text record (no prompt/response turns) cannot be written as a "
                                 "user/assistant conversation for this tool; export it with --to hf or --to megatron")
            problem = alternation_problem(turns)
            if problem:
                raise InputError(f"{where}: not an alternating user/assistant conversation ({problem}); this tool "
                                 "would skip the record and change the mixture")
        yield where, turns
