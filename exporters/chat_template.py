"""Translate a Hugging Face Jinja chat template into an Ollama Go template that renders the same text.

The Jinja template is executed as ``transformers.apply_chat_template`` executes it (sandboxed, ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``tools=None``) on probe conversations whose contents are unique marker
words. Cutting the output at the markers gives the text around each message: the preamble (BOS, a default
system prompt), the system block, the user and assistant wrappers (first/middle/last when they differ, e.g.
Qwen3's empty think block on the final assistant turn), where a system prompt goes when the format has no
system role (Gemma folds it into the first user turn, Mistral into the last), and the generation prompt. From
these pieces a Go template is assembled, and it is then executed (:func:`.go_template.render`) on ten conversation
shapes (with and without a system prompt, ending on a user or an assistant turn) and compared with the Jinja
output character for character. Anything that does not reproduce exactly is an
:class:`~quantforge.errors.UntranslatableTemplate` naming the construct or the conversation that differs.

Message contents are inserted as they are: a Jinja ``| trim`` on contents has no Go counterpart and only
matters for contents with surrounding whitespace. Tool calls and tool messages are not translated.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UntranslatableTemplate
from .go_template import render as render_go

SYS, U1, A1, U2, A2 = "QfSystem0", "QfUser1", "QfAssistant1", "QfUser2", "QfAssistant2"
#: Jinja globals with no Go equivalent in Ollama, refused by name.
REFUSED_CALLS = {"strftime_now": "strftime_now (the current date; Ollama's currentDate has another format)"}


def jinja_renderer(template: str, special_tokens: dict[str, str] | None = None
                   ) -> Callable[[list[dict[str, str]], bool], str]:
    """``render(messages, add_generation_prompt)`` executing ``template`` as transformers does."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise UntranslatableTemplate(f"the chat template is not valid Jinja ({exc.message}, line {exc.lineno})"
                                     ) from exc
    tokens = dict(special_tokens or {})

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return compiled.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **tokens)
        except jinja2.TemplateError as exc:
            raise UntranslatableTemplate(f"the chat template fails on a {_shape(messages)} conversation "
                                         f"({exc})") from exc
    return render


def _msgs(*pairs: str) -> list[dict[str, str]]:
    roles = {"S": "system", "U": "user", "A": "assistant"}
    return [{"role": roles[p[:1]], "content": p[1:]} for p in pairs]


def _shape(messages: list[dict[str, Any]]) -> str:
    return " + ".join(str(m.get("role")) for m in messages)


def _between(text: str, start: str | None, end: str | None, what: str) -> str:
    i = 0 if start is None else text.find(start)
    if i < 0:
        raise UntranslatableTemplate(f"the chat template does not insert {what} verbatim")
    i = 0 if start is None else i + len(start)
    j = len(text) if end is None else text.find(end, i)
    if j < 0:
        raise UntranslatableTemplate(f"the chat template does not insert {what} verbatim, or reorders messages")
    return text[i:j]


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def _lit(text: str) -> str:
    """Literal text for the Go template (as a string action if it would read as an action)."""
    return text if "{{" not in text and "}}" not in text else "{{ " + json.dumps(text) + " }}"


@dataclass(frozen=True)
class ChatPieces:
    """The text around each message, as the Jinja template renders it."""

    pre: str                # before the first message, no system prompt (BOS, a default system block)
    pre_sys: str            # before the system prompt (or before the first user turn when it is folded in)
    sys_suffix: str         # after the system prompt (SYSTEM_BLOCK placement only)
    sys_mode: str           # "block", "first_user", "last_user", or "none" (no system role)
    sys_sep: str            # between a folded system prompt and the user's content
    user_pre: str
    user_suf: str
    asst_pre: str
    asst_suf: str
    asst_pre_last: str
    asst_suf_last: str
    gen: str


def chat_pieces(render: Callable[[list[dict[str, str]], bool], str]) -> ChatPieces:
    """Cut probe renderings at the marker contents (see the module docstring)."""
    t1n = render(_msgs("U" + U1), False)
    t1 = render(_msgs("U" + U1), True)
    t2 = render(_msgs("U" + U1, "A" + A1), False)
    t4 = render(_msgs("U" + U1, "A" + A1, "U" + U2, "A" + A2), False)
    if not t1.startswith(t1n):
        raise UntranslatableTemplate("add_generation_prompt changes the text before the generation prompt")
    gen = t1[len(t1n):]
    head = _between(t1n, None, U1, "user content")
    user_suf = _between(t1n, U1, None, "user content")
    mid_ua = _between(t4, U1, A1, "assistant content")
    if not mid_ua.startswith(user_suf):
        raise UntranslatableTemplate("the text after a user turn depends on the next message's role")
    asst_pre = mid_ua[len(user_suf):]
    last_ua = _between(t2, U1, A1, "assistant content")
    if not last_ua.startswith(user_suf):
        raise UntranslatableTemplate("the text after a user turn depends on the next message's role")
    asst_pre_last = last_ua[len(user_suf):]
    asst_suf_last = _between(t2, A1, None, "assistant content")
    x = _between(t4, A1, U2, "a second user turn")
    if x.startswith(asst_suf_last) and head.endswith(x[len(asst_suf_last):]):
        user_pre = x[len(asst_suf_last):]  # the natural cut: a middle assistant turn ends like the last one
    else:
        user_pre = _common_suffix(head, x)
    pre = head[:len(head) - len(user_pre)]
    asst_suf = x[:len(x) - len(user_pre)]
    pieces = ChatPieces(pre, pre, "", "none", "", user_pre, user_suf, asst_pre, asst_suf, asst_pre_last,
                        asst_suf_last, gen)
    try:
        s3 = render(_msgs("S" + SYS, "U" + U1, "A" + A1, "U" + U2), True)
    except UntranslatableTemplate:
        return pieces  # no system role (Gemma 2 refuses one): system messages are left out
    i_sys, i_u1, i_u2 = s3.find(SYS), s3.find(U1), s3.find(U2)
    if i_sys < 0:
        raise UntranslatableTemplate("the chat template drops or rewrites the system prompt")
    sys_sep = ""
    if i_sys < i_u1:
        before, after = s3[:i_sys], s3[i_sys + len(SYS):i_u1]
        if after.endswith(user_pre):
            mode, pre_sys, sys_suffix = "block", before, after[:len(after) - len(user_pre)]
        elif before.endswith(user_pre):
            mode, pre_sys, sys_suffix, sys_sep = "first_user", before[:len(before) - len(user_pre)], "", after
        else:
            raise UntranslatableTemplate("the system prompt sits inside the first user turn in a way the "
                                         "user wrapper does not explain")
    elif i_u1 < i_sys < i_u2:
        before = s3[:i_u1]
        if not before.endswith(user_pre):
            raise UntranslatableTemplate("the first user turn changes shape when a system prompt is given")
        mode, pre_sys, sys_suffix = "last_user", before[:len(before) - len(user_pre)], ""
        sys_sep = s3[i_sys + len(SYS):i_u2]
    else:
        raise UntranslatableTemplate("the system prompt is placed after the last user turn")
    return dataclasses.replace(pieces, pre_sys=pre_sys, sys_suffix=sys_suffix, sys_mode=mode, sys_sep=sys_sep)


def assemble(p: ChatPieces) -> str:
    """The Ollama TEMPLATE for ``p`` (Ollama passes ``.Messages``: system, user and assistant turns)."""
    fold = {"first_user": "(and $hasSys (eq $i 1))", "last_user": "(and $hasSys $last)"}.get(p.sys_mode)
    user = f"{_lit(p.user_pre)}{{{{ .Content }}}}{_lit(p.user_suf)}"
    if fold:
        user = (f"{{{{ if {fold} }}}}{_lit(p.user_pre)}{{{{ $sys }}}}{_lit(p.sys_sep)}{{{{ .Content }}}}"
                f"{_lit(p.user_suf)}{{{{ else }}}}{user}{{{{ end }}}}")
    asst = f"{_lit(p.asst_pre)}{{{{ .Content }}}}{_lit(p.asst_suf)}"
    if (p.asst_pre_last, p.asst_suf_last) != (p.asst_pre, p.asst_suf):
        asst = (f"{{{{ if $last }}}}{_lit(p.asst_pre_last)}{{{{ .Content }}}}{_lit(p.asst_suf_last)}"
                f"{{{{ else }}}}{asst}{{{{ end }}}}")
    if p.sys_mode == "block":
        head = (f"{{{{ if $hasSys }}}}{_lit(p.pre_sys)}{{{{ $sys }}}}{_lit(p.sys_suffix)}{{{{ else }}}}"
                f"{_lit(p.pre)}{{{{ end }}}}")
    elif p.pre_sys != p.pre:
        head = f"{{{{ if $hasSys }}}}{_lit(p.pre_sys)}{{{{ else }}}}{_lit(p.pre)}{{{{ end }}}}"
    else:
        head = _lit(p.pre)
    gen = f"{{{{ if $gen }}}}{_lit(p.gen)}{{{{ end }}}}" if p.gen else ""
    return ("{{- $hasSys := false }}{{ $sys := \"\" }}{{ $gen := true }}"
            "{{ if .Messages }}{{ if eq (index .Messages 0).Role \"system\" }}{{ $hasSys = true }}"
            "{{ $sys = (index .Messages 0).Content }}{{ end }}{{ end }}"
            "{{ range .Messages }}{{ $gen = ne .Role \"assistant\" }}{{ end -}}\n"
            f"{head}"
            "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            f"{{{{ if eq .Role \"user\" }}}}{user}{{{{ else if eq .Role \"assistant\" }}}}{asst}{{{{ end }}}}"
            f"{{{{ end }}}}{gen}")


PROBES = [("U",), ("U", "A"), ("U", "A", "U"), ("U", "A", "U", "A"), ("U", "A", "U", "A", "U"),
          ("S", "U"), ("S", "U", "A"), ("S", "U", "A", "U"), ("S", "U", "A", "U", "A"), ("S", "U", "A", "U", "A", "U")]
_CONTENT = {"S": "You are terse.\nAnswer in English.", "U": "Question {n}:\nwhat is {n} + {n}?",
            "A": "It is {n}.\nAnything else?"}


def probe_conversation(shape: tuple[str, ...]) -> list[dict[str, str]]:
    """A conversation of roles ``shape`` with multi-line contents (no surrounding whitespace)."""
    roles = {"S": "system", "U": "user", "A": "assistant"}
    return [{"role": roles[r], "content": _CONTENT[r].format(n=i)} for i, r in enumerate(shape)]


def ollama_messages(messages: list[dict[str, str]]) -> dict[str, Any]:
    """The data Ollama executes a TEMPLATE with, for ``messages``."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
            "Tools": None, "Response": "", "Prompt": ""}


@dataclass(frozen=True)
class Translation:
    """A translated chat template: the Go ``template`` and the ``pieces`` it was built from."""

    template: str
    pieces: ChatPieces

    def stops(self, eos_token: str | None = None) -> list[str]:
        """Stop strings for Ollama: the end-of-turn marker of an assistant turn, then the EOS token."""
        out = [s for s in (self.pieces.asst_suf_last.strip(), (eos_token or "").strip()) if s]
        return list(dict.fromkeys(out))


def translate(template: str, special_tokens: dict[str, str] | None = None, strip_bos: bool = False
              ) -> Translation:
    """The Go template equivalent of the Jinja chat ``template``, verified on :data:`PROBES`.

    ``strip_bos``: leave out a leading BOS token text, for runtimes that add BOS to every prompt themselves
    (llama.cpp when the GGUF says ``add_bos_token``); the Go output is then the Jinja output less that prefix."""
    for name, what in REFUSED_CALLS.items():
        if name in template:
            raise UntranslatableTemplate(f"the chat template calls {what}, which has no Go-template equivalent")
    render = jinja_renderer(template, special_tokens)
    pieces = chat_pieces(render)
    bos = (special_tokens or {}).get("bos_token") or ""
    strip = bos if strip_bos and bos and pieces.pre.startswith(bos) and pieces.pre_sys.startswith(bos) else ""
    if strip:
        pieces = dataclasses.replace(pieces, pre=pieces.pre[len(strip):], pre_sys=pieces.pre_sys[len(strip):])
    go = assemble(pieces)
    for shape in PROBES:
        if pieces.sys_mode == "none" and shape[0] == "S":
            continue
        msgs = probe_conversation(shape)
        want = render(msgs, shape[-1] != "A")
        got = strip + render_go(go, ollama_messages(msgs))
        if got != want:
            i = next((k for k, (x, y) in enumerate(zip(got, want, strict=False)) if x != y), min(len(got), len(want)))
            raise UntranslatableTemplate(
                f"no Go template reproduces the chat template on a {_shape(msgs)} conversation: they differ at "
                f"character {i} (Jinja {want[i:i + 40]!r}, Go {got[i:i + 40]!r})")
    return Translation(go, pieces)
