"""Chat templates that only paste message contents in, rendered from cached pieces instead of by Jinja.

Rendering a short conversation through Jinja costs ~60 us (two renders per record: the prompt and the prompt with
its response), a fifth of cold preparation once tokenization is fast (ascii_bpe). Most chat templates (SmolLM2's,
ChatML's, Qwen2's, Zephyr's) do nothing with a message's content but concatenate it into the output: what they
write then depends on the conversation's roles and on nothing in the contents. Such a template is rendered once
per shape (the roles in order, and whether a generation prompt follows) with placeholder contents, and each
conversation of that shape is the literal pieces around the placeholders with its contents put in.

That a template only pastes content is decided from its syntax tree, conservatively: a message's content may flow
only through `+`, `~` and conditional expressions into `{{ ... }}`; a message only into `message.key` lookups;
`messages` only into loops, indexing, slicing and `|length`. Anything else (a filter or method on the content,
`trim`, a comparison, `set`, a macro, `loop.previtem`, `{% generation %}`, an unknown node) makes the template not
handled, and it keeps being rendered by Jinja. A shape whose placeholder render fails is rendered by Jinja too,
so its error is raised exactly where it arises.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Render = Callable[[list[list[dict[str, str]]], bool], list[str]]
SAFE, LIST, MESSAGE, CONTENT = "safe", "list", "message", "content"  # what an expression may evaluate to
PLACEHOLDER = re.compile("\x00([0-9]+)\x00")  # content i while a shape is rendered; never in a template's text
# Tests whose outcome is the same for every string (what a content may be tested with)
VALUE_FREE_TESTS = {"defined", "undefined", "none", "string", "mapping", "sequence", "iterable", "number"}


class _Inspects(Exception):
    """The template may look into message contents (or messages) in a way this module does not follow."""


def pastes_content_only(source: str) -> bool:
    """Does the chat template `source` use message contents only by pasting them into its output?"""
    try:
        import jinja2

        tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
        _Checker().statements(tree.body, {})
    except (_Inspects, jinja2.TemplateSyntaxError, RecursionError):  # deeply nested: Jinja renders it
        return False
    return True


class _Checker:
    """Walks a Jinja syntax tree and raises _Inspects where content or messages go anywhere not allowed."""

    def statements(self, body: list[Any], scope: dict[str, str]) -> None:
        from jinja2 import nodes

        for node in body:
            if isinstance(node, nodes.Output):
                for child in node.nodes:
                    self.kind(child, scope, CONTENT)
            elif isinstance(node, nodes.If):
                self.kind(node.test, scope, SAFE)
                self.statements(node.body, scope)
                for branch in node.elif_:
                    self.kind(branch.test, scope, SAFE)
                    self.statements(branch.body, scope)
                self.statements(node.else_, scope)
            elif isinstance(node, nodes.For):
                self.loop(node, scope)
            elif isinstance(node, nodes.Assign):  # {% set x = ... %}: only values free of contents and messages
                self.kind(node.node, scope, SAFE)
                for name in _names(node.target):
                    if name.name == "messages":
                        raise _Inspects("messages replaced")
                    scope[name.name] = SAFE
            elif isinstance(node, nodes.ExprStmt):
                self.kind(node.node, scope, SAFE)
            elif not isinstance(node, (nodes.Break, nodes.Continue)):
                raise _Inspects(type(node).__name__)  # macros, blocks, set blocks, includes, extensions

    def loop(self, node: Any, scope: dict[str, str]) -> None:
        from jinja2 import nodes

        over = self.kind(node.iter, scope, MESSAGE)
        if over == LIST:  # for message in messages: the target is a message
            if not isinstance(node.target, nodes.Name):
                raise _Inspects("unpacked messages")
            inner = {**scope, node.target.name: MESSAGE}
        elif over == SAFE:
            inner = {**scope, **{n.name: SAFE for n in _names(node.target)}}
        else:
            raise _Inspects("loop over a message or a content")
        if node.test is not None:
            self.kind(node.test, inner, SAFE)
        self.statements(node.body, inner)
        self.statements(node.else_, scope)

    def kind(self, node: Any, scope: dict[str, str], allowed: str) -> str:
        """What `node` evaluates to; raises _Inspects if that is more than `allowed` lets through: SAFE (no
        content, no message), MESSAGE (a message or the message list too, to be looked into), CONTENT (content
        too: it is pasted into the output)."""
        result = self._kind(node, scope, allowed)
        if result != SAFE and not ((allowed == MESSAGE and result in (LIST, MESSAGE))
                                   or (allowed == CONTENT and result == CONTENT)):
            raise _Inspects(f"{result} in a {allowed} place")
        return result

    def _kind(self, node: Any, scope: dict[str, str], allowed: str) -> str:
        from jinja2 import nodes

        if isinstance(node, (nodes.Const, nodes.TemplateData)):
            return SAFE
        if isinstance(node, nodes.Name):
            return scope.get(node.name, LIST if node.name == "messages" else SAFE)
        if isinstance(node, (nodes.Getattr, nodes.Getitem)):
            return self.lookup(node, scope)
        pasting = CONTENT if allowed == CONTENT else SAFE
        if isinstance(node, (nodes.Add, nodes.Concat, nodes.CondExpr)):
            if isinstance(node, nodes.CondExpr):
                self.kind(node.test, scope, SAFE)
                parts = [node.expr1] + ([node.expr2] if node.expr2 is not None else [])
            else:
                parts = node.nodes if isinstance(node, nodes.Concat) else [node.left, node.right]
            return CONTENT if any(self.kind(p, scope, pasting) == CONTENT for p in parts) else SAFE
        if isinstance(node, nodes.Filter) and node.name == "length" and not node.args and not node.kwargs:
            if self.kind(node.node, scope, MESSAGE) in (LIST, SAFE):  # how many messages: the shape
                return SAFE
            raise _Inspects("length of a message")
        if isinstance(node, nodes.Test) and node.name in VALUE_FREE_TESTS and not node.args:
            self._kind(node.node, scope, CONTENT)
            return SAFE
        if isinstance(node, (nodes.Compare, nodes.Operand, nodes.BinExpr, nodes.UnaryExpr, nodes.Filter, nodes.Test,
                             nodes.Call, nodes.List, nodes.Tuple, nodes.Dict, nodes.Pair, nodes.Keyword,
                             nodes.Slice)):
            for child in node.iter_child_nodes():
                self.kind(child, scope, SAFE)
            return SAFE
        raise _Inspects(type(node).__name__)

    def lookup(self, node: Any, scope: dict[str, str]) -> str:
        """`x.key` or `x[key]`: into the messages, a message, or something else."""
        from jinja2 import nodes

        base = self.kind(node.node, scope, MESSAGE)
        if isinstance(node, nodes.Getattr):
            key: Any = node.attr
        elif isinstance(node.arg, nodes.Const):
            key = node.arg.value
        else:
            self.kind(node.arg, scope, SAFE)
            key = slice(None) if isinstance(node.arg, nodes.Slice) else None
        if base == LIST:
            if isinstance(key, str):
                raise _Inspects("an attribute of the message list")
            return LIST if isinstance(key, slice) else MESSAGE
        if base == MESSAGE:
            if not isinstance(key, str):
                raise _Inspects("a message looked into by a computed key")
            if hasattr(dict, key):  # message.get('content'), message.items(): contents through a dict method
                raise _Inspects("a dict method of a message")
            return CONTENT if key == "content" else SAFE
        if isinstance(node.node, nodes.Name) and node.node.name == "loop" and key in ("previtem", "nextitem"):
            raise _Inspects("a message through loop")  # loop.previtem is a message when looping over messages
        return SAFE


def _names(target: Any) -> list[Any]:
    """The names a `set` or `for` target binds (find_all leaves out the node itself)."""
    from jinja2 import nodes

    return [target] if isinstance(target, nodes.Name) else list(target.find_all(nodes.Name))


class PieceRenderer:
    """Renders conversations as `render` does, from literal pieces cached per shape (template permitting)."""

    def __init__(self, render: Render):
        self._render = render
        self._shapes: dict[tuple[tuple[str, ...], bool], list[str | int] | None] = {}

    def __call__(self, conversations: list[list[dict[str, str]]], generation_prompt: bool) -> list[str]:
        out: list[str | None] = []
        by_jinja = []
        for k, messages in enumerate(conversations):
            pieces = self._pieces(messages, generation_prompt)
            if pieces is None:
                out.append(None)
                by_jinja.append(k)
            else:
                out.append("".join(p if isinstance(p, str) else messages[p]["content"] for p in pieces))
        if by_jinja:
            for k, text in zip(by_jinja, self._render([conversations[k] for k in by_jinja], generation_prompt)):
                out[k] = text
        return out  # type: ignore[return-value]

    def _pieces(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[str | int] | None:
        """The shape's output as literal text and message indices (whose content goes there); None: by Jinja."""
        if any(set(m) != {"role", "content"} or not isinstance(m["content"], str) for m in messages):
            return None
        key = (tuple(m["role"] for m in messages), generation_prompt)
        if key not in self._shapes:
            self._shapes[key] = self._shape(key[0], generation_prompt)
        return self._shapes[key]

    def _shape(self, roles: tuple[str, ...], generation_prompt: bool) -> list[str | int] | None:
        placeholders = [{"role": role, "content": f"\x00{i}\x00"} for i, role in enumerate(roles)]
        try:
            (text,) = self._render([placeholders], generation_prompt)
        except Exception:  # rendered by Jinja, which raises it where it arises
            return None
        parts = PLACEHOLDER.split(text)
        if "\x00" in "".join(parts[::2]):
            return None
        return [p if i % 2 == 0 else int(p) for i, p in enumerate(parts) if i % 2 or p]
