"""Final answers of math records and generations: extraction, normalised string equality, and math-verify.

The string rule (GSM8K `#### 42`, `\\boxed{...}`, `The answer is ...`, the last number; numbers canonicalised) is
the historical `accuracy`; `math_verify_equal` compares the same answers as mathematical objects (fractions, LaTeX,
`\\boxed{}`, units stripped) with the math-verify library, as math evaluations do.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[i:j]
            depth -= 1
    return None


def normalize_answer(answer: str) -> str:
    """Compare answers as strings, with numbers in one canonical form (`1,000.0` == `1000`)."""
    answer = answer.strip().strip("$").strip().rstrip(".").strip()
    number = answer.replace(",", "")
    try:
        value = float(number)
    except ValueError:
        return re.sub(r"\s+", " ", answer)
    return str(int(value)) if value.is_integer() else repr(value)


def extract_answer(text: str) -> str | None:
    """The final answer a text commits to: GSM8K `#### 42`, a `\\boxed{...}`, `The answer is ...`, or the last
    number. None if there is none."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return normalize_answer(tail.splitlines()[0]) if tail else None
    boxed = _boxed(text)
    if boxed is not None:
        return normalize_answer(boxed)
    said = re.findall(r"answer is[:\s]*\$?(-?\d[\d,]*(?:\.\d+)?)", text, flags=re.IGNORECASE)
    if said:
        return normalize_answer(said[-1])
    numbers = _NUMBER.findall(text)
    return normalize_answer(numbers[-1]) if numbers else None


def _final_part(text: str) -> str:
    """The part of a response math-verify should read: the GSM8K tail after `####` if there is one (the worked
    solution before it holds many numbers), else the whole response."""
    return text.rsplit("####", 1)[1].strip() if "####" in text else text


def math_verify_equal(reference: str, generated: str) -> bool:
    """Whether the generated text's final answer equals the reference response's, as math-verify judges it."""
    from math_verify import parse, verify  # imported when answers are checked: sympy is slow to import

    gold = parse(_final_part(reference))
    if not gold:
        return False
    answer = parse(_final_part(generated))
    return bool(answer) and bool(verify(gold, answer))
