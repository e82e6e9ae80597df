"""Templates that only paste contents are rendered from cached pieces exactly as apply_chat_template renders them;
every other template is refused and keeps being rendered by Jinja."""

from __future__ import annotations

import copy
import random

import pytest

from conftest import ROOT, SMOLLM2
from scalebio_cli import tiny
from scalebio_cli.data import render
from scalebio_cli.data.template_pieces import PieceRenderer, pastes_content_only

SMOLLM2_TEMPLATE = SMOLLM2 / "chat_template.jinja"

QWEN2 = "".join([  # Qwen2.5's layout, tool branches included
    "{%- if tools %}{{- '<|im_start|>system\\n' }}",
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}",
    "{%- else %}{{- 'You are Qwen.' }}{%- endif %}{{- '<|im_end|>\\n' }}",
    "{%- else %}{%- if messages[0]['role'] == 'system' %}",
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}",
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud.<|im_end|>\\n' }}{%- endif %}",
    "{%- endif %}\n{%- for message in messages %}\n",
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)",
    " or (message.role == 'assistant' and not message.tool_calls) %}\n",
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n",
    "{%- elif message.role == 'tool' %}{{- '<tool_response>\\n' }}{{- message.content }}",
    "{{- '\\n</tool_response>' }}\n{%- endif %}{%- endfor %}\n",
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n",
])
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}
{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}"""
# Drops the system content, repeats the first one, numbers the turns, uses ~ and a conditional expression.
ODD = """{% set ns = namespace(n=0) %}{% for m in messages[1:] if m.role != 'system' %}{% set ns.n = ns.n + 1 %}
[{{ ns.n }}/{{ messages|length }}] {{ m['role'] ~ ': ' ~ (m['content'] if m.role == 'user' else '>' + m.content) }}
{% endfor %}{{ 'again: ' + messages[0]['content'] if messages|length > 2 else '' }}
{%- if add_generation_prompt %}[assistant]{% endif %}"""
# Refuses some shapes: those are rendered by Jinja, which raises where it arises.
ALTERNATING = """{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}
{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}
{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"""

PASTING = {"tiny": tiny.CHAT_TEMPLATE, "chatml": (ROOT / "recipes" / "templates" / "chatml.jinja").read_text(),
           "qwen2": QWEN2, "zephyr": ZEPHYR, "odd": ODD, "alternating": ALTERNATING}
if SMOLLM2_TEMPLATE.is_file():
    PASTING["smollm2"] = SMOLLM2_TEMPLATE.read_text()

LOOKING = {
    "trim (the shipped llama3 template)": (ROOT / "recipes" / "templates" / "llama3.jinja").read_text(),
    "a test on the content": "{% for m in messages %}{% if '</think>' in m.content %}x{% endif %}{{ m.content }}"
                             "{% endfor %}",
    "content as a condition": "{% for m in messages %}{% if m['content'] %}[{{ m['content'] }}]{% endif %}{% endfor %}",
    "a method on the content": "{% for m in messages %}{{ m.content.split('</think>')[-1] }}{% endfor %}",
    "a comparison": "{% for m in messages %}{{ m.content if m.content != '' else 'empty' }}{% endfor %}",
    "the length of a content": "{% for m in messages %}{{ m.content|length }}{% endfor %}",
    "a message as JSON": "{% for m in messages %}{{ m|tojson }}{% endfor %}",
    "the messages as JSON": "{{ messages|tojson }}",
    "a content kept in a variable": "{% for m in messages %}{% set c = m.content %}{{ c }}{% endfor %}",
    "messages replaced": "{% set messages = [] %}{{ 'x' }}",
    "a neighbour through loop": "{% for m in messages %}{{ loop.previtem.content if not loop.first }}{% endfor %}",
    "a computed key": "{% for m in messages %}{{ m[m.role] }}{% endfor %}",
    "a dict method of a message": "{% for m in messages %}{{ m.get('content').strip() }}{% endfor %}",
    "the items of a message": "{% for m in messages %}{% for k, v in m.items() %}{{ v|trim }}{% endfor %}{% endfor %}",
    "a macro": "{% macro f(x) %}{{ x }}{% endmacro %}{% for m in messages %}{{ f(m.content) }}{% endfor %}",
    "a set block": "{% for m in messages %}{% set t %}{{ m.content }}{% endset %}{{ t|trim }}{% endfor %}",
    "generation tags": "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
    "content repeated by multiplication": "{% for m in messages %}{{ m.content * 2 }}{% endfor %}",
    "looping over a content": "{% for m in messages %}{% for c in m.content %}{{ c }}{% endfor %}{% endfor %}",
}

CONTENTS = ["", " ", "hi", "  spaced  ", "\n\nnew\nlines\n", "{{ not jinja }} {% if %}", "\x00 0 \x00", "π ≈ 3.14",
            "<|im_end|>", "</think>", "trailing\t"]


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        roles = (["system"] if rng.random() < 0.3 else []) + ["user", "assistant"] * rng.randint(1, 3)
        if rng.random() < 0.2:
            roles = roles[:-1]
        if rng.random() < 0.1:
            roles.insert(rng.randrange(len(roles) + 1), rng.choice(["user", "assistant", "tool"]))
        out.append([{"role": r, "content": rng.choice(CONTENTS) + rng.choice(CONTENTS)} for r in roles])
    return out


def with_template(tokenizer, template: str):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def reference(tok, conversation: list[dict[str, str]], generation_prompt: bool) -> str | type[Exception]:
    try:
        return tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # the same error type is expected from the pieces' fallback
        return type(e)


@pytest.mark.parametrize("name", list(PASTING))
def test_pieces_render_what_apply_chat_template_renders(tokenizer, name: str) -> None:
    tok = with_template(tokenizer, PASTING[name])
    renderer = render._batch_renderer(tok)
    assert isinstance(renderer, PieceRenderer)
    for generation_prompt in (True, False):
        for conversation in conversations(150, seed=int(generation_prompt)):
            expected = reference(tok, conversation, generation_prompt)
            if isinstance(expected, str):
                assert renderer([conversation], generation_prompt) == [expected]
            else:
                with pytest.raises(expected):
                    renderer([conversation], generation_prompt)
    assert renderer._shapes  # pieces were made (and used)


def test_a_batch_mixes_cached_shapes_and_jinja_in_order(tokenizer) -> None:
    tok = with_template(tokenizer, PASTING["qwen2"])
    renderer = render._batch_renderer(tok)
    batch = conversations(40, seed=3)
    batch[5] = [{"role": "user", "content": "x", "name": "extra key: rendered by Jinja"}]
    assert renderer(batch, True) == [reference(tok, c, True) for c in batch]


@pytest.mark.parametrize("why", list(LOOKING))
def test_templates_that_look_into_contents_are_refused(why: str, tokenizer) -> None:
    assert not pastes_content_only(LOOKING[why])
    tok = with_template(tokenizer, LOOKING[why]) if why != "generation tags" else None
    if tok is not None:
        assert not isinstance(render._batch_renderer(tok), PieceRenderer)


def test_pasting_templates_are_accepted() -> None:
    assert all(pastes_content_only(t) for t in PASTING.values())


@pytest.mark.parametrize("why", ["trim (the shipped llama3 template)", "a test on the content",
                                 "content as a condition", "a message as JSON", "a method on the content",
                                 "a dict method of a message"])
def test_pieces_would_render_those_wrongly(why: str, tokenizer) -> None:
    """Why the refusals matter: forced onto a template that looks into contents, the pieces render differently."""
    tok = with_template(tokenizer, LOOKING[why])
    jinja = render._batch_renderer(tok)
    forced = PieceRenderer(jinja)
    batch = conversations(60, seed=4)
    assert forced(batch, False) != jinja(batch, False)
