"""A renderer for the subset of Go's ``text/template`` that Ollama chat templates use.

Enough to execute the templates :mod:`.chat_template` writes (and Ollama's own simple ones) so their output can
be checked against the Jinja chat template without Go: text with ``{{- ... -}}`` whitespace trimming, ``if`` /
``else if`` / ``else`` / ``end``, ``range`` (with ``$i, $x :=``), variable declaration (``:=``) and assignment
(``=``), field chains (``.Messages``, ``$.System``, ``$m.Role``, ``(index .Messages 0).Role``), string / number /
bool literals, pipelines (``x | f``), and the builtins ``and or not eq ne lt le gt ge len index slice print``.
Semantics follow Go: truth is "non-empty", ``and``/``or`` return an operand, ``eq`` takes several operands, a
variable lives until the ``end`` of the block that declared it. Anything else is a :class:`GoTemplateError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError


class GoTemplateError(InputError):
    """A template outside the supported subset, or one that fails while executing."""


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+)|(?P<decl>:=)|(?P<assign>=)'
                    r'|(?P<lp>\()|(?P<rp>\))|(?P<pipe>\|)|(?P<comma>,)|(?P<var>\$[A-Za-z0-9_]*)'
                    r'|(?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*))')
_WS = " \t\r\n"


@dataclass
class _Node:
    kind: str
    expr: Any = None
    body: list[Any] = field(default_factory=list)
    orelse: list[Any] = field(default_factory=list)
    names: tuple[str, ...] = ()


def _lex(template: str) -> list[tuple[str, str]]:
    """``("text", s)`` and ``("action", s)`` items with Go's trim markers applied to the neighbouring text."""
    items: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip(_WS)
        if m.group(1):
            text = text.rstrip(_WS)
        items.append(("text", text))
        items.append(("action", m.group(2).strip()))
        trim_next, pos = bool(m.group(3)), m.end()
    tail = template[pos:]
    items.append(("text", tail.lstrip(_WS) if trim_next else tail))
    return [it for it in items if it != ("text", "")]


def _tokens(src: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    src = src.rstrip()
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m or m.end() == pos:
            raise GoTemplateError(f"cannot parse Go template action {{{{ {src} }}}} at {src[pos:]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def parse(template: str) -> list[Any]:
    """The template as a tree of nodes (raises :class:`GoTemplateError` outside the subset)."""
    stack: list[tuple[_Node, list[Any]]] = []
    root: list[Any] = []
    cur = root
    for kind, value in _lex(template):
        if kind == "text":
            cur.append(_Node("text", value))
            continue
        if value.startswith("/*"):
            continue
        head = value.split(None, 1)[0] if value else ""
        rest = value[len(head):].strip()
        if head == "if":
            node = _Node("if", _tokens(rest))
            cur.append(node)
            stack.append((node, cur))
            cur = node.body
        elif head == "range":
            toks = _tokens(rest)
            names: tuple[str, ...] = ()
            if any(k == "decl" for k, _ in toks):
                i = [k for k, _ in toks].index("decl")
                names = tuple(v for k, v in toks[:i] if k == "var")
                toks = toks[i + 1:]
            node = _Node("range", toks, names=names)
            cur.append(node)
            stack.append((node, cur))
            cur = node.body
        elif head == "else":
            if not stack or stack[-1][0].kind != "if":
                raise GoTemplateError("{{ else }} outside an {{ if }}")
            node = stack[-1][0]
            if rest.startswith("if "):
                inner = _Node("if", _tokens(rest[3:]))
                node.orelse.append(inner)
                stack.append((inner, None))  # closed by the same {{ end }}
                cur = inner.body
            else:
                cur = node.orelse
        elif head == "end":
            if not stack:
                raise GoTemplateError("{{ end }} without a block")
            while True:
                node, parent = stack.pop()
                if parent is not None:
                    break
            cur = parent
        elif head in ("with", "define", "template", "block", "break", "continue"):
            raise GoTemplateError(f"Go template action {head!r} is not supported")
        else:
            cur.append(_Node("action", _tokens(value)))
    if stack:
        raise GoTemplateError("unclosed {{ if }} / {{ range }} block")
    return root


def _truth(v: Any) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, (int, float, str, list, tuple, dict)) and not isinstance(v, bool):
        return len(v) > 0 if isinstance(v, (str, list, tuple, dict)) else v != 0
    return bool(v)


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "<no value>"
    return str(v)


def _field(v: Any, name: str) -> Any:
    if isinstance(v, dict):
        if name not in v:
            raise GoTemplateError(f"can't evaluate field {name}")
        return v[name]
    if hasattr(v, name):
        return getattr(v, name)
    raise GoTemplateError(f"can't evaluate field {name} in type {type(v).__name__}")


def _eq(a: Any, *others: Any) -> bool:
    return any(a == b for b in others)


_FUNCS = {
    "not": lambda x: not _truth(x),
    "eq": _eq,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "len": lambda x: len(x),
    "index": lambda x, *ks: _index(x, ks),
    "slice": lambda x, *ix: x[ix[0]:ix[1]] if len(ix) > 1 else x[ix[0]:] if ix else x,
    "print": lambda *xs: "".join(_text(x) for x in xs),
}


def _index(x: Any, keys: tuple[Any, ...]) -> Any:
    for k in keys:
        try:
            x = x[k]
        except (IndexError, KeyError, TypeError) as exc:
            raise GoTemplateError(f"error calling index: {exc}") from exc
    return x


class _Scope:
    def __init__(self, root: Any) -> None:
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def lookup(self, name: str) -> Any:
        for f in reversed(self.frames):
            if name in f:
                return f[name]
        raise GoTemplateError(f"undefined variable {name}")

    def assign(self, name: str, value: Any) -> None:
        for f in reversed(self.frames):
            if name in f:
                f[name] = value
                return
        raise GoTemplateError(f"undefined variable {name}")


class _Eval:
    def __init__(self, root: Any) -> None:
        self.scope = _Scope(root)

    def pipeline(self, toks: list[tuple[str, str]], dot: Any) -> Any:
        """A pipeline, possibly a declaration ``$x := ...`` or assignment ``$x = ...`` (returns None then)."""
        if len(toks) >= 2 and toks[0][0] == "var" and toks[1][0] in ("decl", "assign"):
            value = self.pipeline(toks[2:], dot)
            if toks[1][0] == "decl":
                self.scope.frames[-1][toks[0][1]] = value
            else:
                self.scope.assign(toks[0][1], value)
            return None
        parts: list[list[tuple[str, str]]] = [[]]
        depth = 0
        for t in toks:
            depth += t[0] == "lp"
            depth -= t[0] == "rp"
            if t[0] == "pipe" and depth == 0:
                parts.append([])
            else:
                parts[-1].append(t)
        value, first = None, True
        for cmd in parts:
            value = self.command(cmd, dot, None if first else (value,))
            first = False
        return value

    def command(self, toks: list[tuple[str, str]], dot: Any, extra: tuple[Any, ...] | None) -> Any:
        args, i = [], 0
        while i < len(toks):
            arg, i = self.operand(toks, i, dot)
            args.append(arg)
        if extra is not None:
            args.append(("value", extra[0]))
        if not args:
            raise GoTemplateError("empty command")
        head = args[0]
        if head[0] == "ident":
            fn = _FUNCS.get(head[1])
            if fn is None:
                if head[1] in ("true", "false"):
                    return head[1] == "true"
                raise GoTemplateError(f"function {head[1]!r} not defined")
            return fn(*[a[1] for a in args[1:]])
        if head[0] == "and_or":
            return head[1]
        if len(args) > 1:
            raise GoTemplateError("can't give arguments to a non-function")
        return head[1]

    def operand(self, toks: list[tuple[str, str]], i: int, dot: Any) -> tuple[tuple[str, Any], int]:
        kind, val = toks[i]
        if kind == "ident" and val in ("and", "or"):
            ops, j = [], i + 1
            while j < len(toks):
                op, j = self.operand(toks, j, dot)
                ops.append(op[1])
            result = ops[0]
            for op in ops:
                result = op
                if (val == "and") != _truth(op):
                    break
            return ("and_or", result), j
        if kind == "ident":
            if val in ("true", "false"):
                return ("value", val == "true"), i + 1
            if val == "nil":
                return ("value", None), i + 1
            return ("ident", val), i + 1
        if kind == "str":
            return ("value", json.loads(val)), i + 1
        if kind == "raw":
            return ("value", val[1:-1]), i + 1
        if kind == "num":
            return ("value", int(val)), i + 1
        if kind == "field":
            return ("value", self.chain(dot, val)), i + 1
        if kind == "var":
            value = self.scope.lookup(val)
            j = i + 1
            if j < len(toks) and toks[j][0] == "field" and toks[j][1] != ".":
                value, j = self.chain(value, toks[j][1]), j + 1
            return ("value", value), j
        if kind == "lp":
            depth, j = 1, i + 1
            while depth:
                if j >= len(toks):
                    raise GoTemplateError("unclosed parenthesis")
                depth += toks[j][0] == "lp"
                depth -= toks[j][0] == "rp"
                j += 1
            value = self.pipeline(toks[i + 1:j - 1], dot)
            if j < len(toks) and toks[j][0] == "field" and toks[j][1] != ".":
                value, j = self.chain(value, toks[j][1]), j + 1
            return ("value", value), j
        raise GoTemplateError(f"unexpected {val!r} in a Go template action")

    def chain(self, value: Any, path: str) -> Any:
        for name in path.split(".")[1:]:
            if name:
                value = _field(value, name)
        return value

    def run(self, nodes: list[Any], dot: Any, out: list[str]) -> None:
        for node in nodes:
            if node.kind == "text":
                out.append(node.expr)
            elif node.kind == "action":
                value = self.pipeline(node.expr, dot)
                if not (len(node.expr) >= 2 and node.expr[1][0] in ("decl", "assign")):
                    out.append(_text(value))
            elif node.kind == "if":
                self.scope.frames.append({})
                try:
                    branch = node.body if _truth(self.pipeline(node.expr, dot)) else node.orelse
                    self.run(branch, dot, out)
                finally:
                    self.scope.frames.pop()
            elif node.kind == "range":
                seq = self.pipeline(node.expr, dot)
                items = list(seq.items()) if isinstance(seq, dict) else list(enumerate(seq or []))
                for k, v in items:
                    self.scope.frames.append({})
                    try:
                        if len(node.names) == 1:
                            self.scope.frames[-1][node.names[0]] = v
                        elif len(node.names) == 2:
                            self.scope.frames[-1][node.names[0]] = k
                            self.scope.frames[-1][node.names[1]] = v
                        self.run(node.body, v, out)
                    finally:
                        self.scope.frames.pop()


def render(template: str, data: dict[str, Any]) -> str:
    """Execute ``template`` on ``data`` (Ollama passes ``System``, ``Messages`` of ``Role``/``Content``, ...)."""
    out: list[str] = []
    _Eval(data).run(parse(template), data, out)
    return "".join(out)
