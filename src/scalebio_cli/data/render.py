"""Render an example to token ids and a trainable mask (True exactly on response tokens).

A conversation is cut into alternating prompt and response text segments, each tokenized on its own and
concatenated. The prompt segment ends with the generation prompt (e.g. `<|im_start|>assistant\\n`), so the tokens
the model is trained to produce are exactly the tokens it would generate at inference after `apply_chat_template(
..., add_generation_prompt=True)`; no token straddles the prompt/response boundary. Chat templates carry their own
special tokens (BOS included), so segments are tokenized without adding any (the reference code's double-BOS bug).
Tokenizers without a chat template get a plain `User:`/`Assistant:` layout with BOS/EOS added by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scalebio_cli.data.records import Example, Turn
from scalebio_cli.errors import InputError

PLAIN_ROLE_PREFIX = {"system": "", "user": "User: "}
PLAIN_GENERATION_PROMPT = "Assistant: "


@dataclass
class Encoded:
    input_ids: list[int]
    trainable: list[bool]  # per token: is it a response token (the loss is taken on it)?

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
                segments.append((turn.content + (tok.eos_token or ""), True))
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
        flat = [text for segments in all_segments for text, _ in segments]
        pieces = iter(self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
        encoded = []
        for segments in all_segments:
            ids: list[int] = []
            trainable: list[bool] = []
            for _, train in segments:
                piece = next(pieces)
                ids.extend(piece)
                trainable.extend([train] * len(piece))
            encoded.append(Encoded(ids[: self.max_length], trainable[: self.max_length]))
        return encoded

    def encode(self, example: Example, where: str = "record") -> Encoded:
        return self.encode_many([(example, where)])[0]

    def encode_prompt(self, turns: list[Turn]) -> list[int]:
        """Token ids of the prompt before the last assistant turn, ending with the generation prompt (for eval)."""
        last = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=len(turns))
        context = turns[:last]
        if self.has_template:
            text = self._template(context, generation_prompt=True)
        else:
            segments = self._plain_segments(context + [Turn("assistant", "")])
            text = "".join(t for t, train in segments if not train)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
