"""Jinja chat templates translated to Ollama Go templates: the Go template renders exactly the text the Hugging
Face chat template renders, and what cannot be translated is refused by name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from quantforge.exporters.chat_template import ollama_messages, translate
from quantforge.exporters.go_template import GoTemplateError, render

from quantforge.errors import UntranslatableTemplate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_templates  # noqa: E402  (the template strings, kept in their own file)

CONVERSATION = [
    {"role": "system", "content": "You are a pirate. Answer briefly."},
    {"role": "user", "content": "Where is the treasure?"},
    {"role": "assistant", "content": "Under the old oak,\nthree paces north."},
    {"role": "user", "content": "And the map?"},
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _hf(tokenizer, template, messages, add_generation_prompt):
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


SPECIAL = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}  # the SmolLM2 tokenizer's, which renders them


@pytest.mark.parametrize("family", sorted(chat_templates.TEMPLATES))
def test_go_template_renders_hf_text(tokenizer, family):
    """System + two user turns (awaiting the answer), and the finished conversation, byte for byte."""
    template = chat_templates.TEMPLATES[family]
    go = translate(template, SPECIAL).template
    for messages, gen in ((CONVERSATION, True), (CONVERSATION + [{"role": "assistant", "content": "Burnt."}], False)):
        want = _hf(tokenizer, template, messages, gen)
        assert render(go, ollama_messages(messages)) == want
    no_system = CONVERSATION[1:]
    assert render(go, ollama_messages(no_system)) == _hf(tokenizer, template, no_system, True)


def test_bos_left_to_the_runtime(tokenizer):
    """With strip_bos the template omits the leading BOS text llama.cpp adds itself; nothing else changes."""
    go = translate(chat_templates.MISTRAL, SPECIAL, strip_bos=True).template
    want = _hf(tokenizer, chat_templates.MISTRAL, CONVERSATION, True)
    assert want.startswith("<|im_start|>") and "<|im_start|>" + render(go, ollama_messages(CONVERSATION)) == want


def test_stops_and_no_system_role(tokenizer):
    """Stop strings come from the assistant turn's end; a template that refuses a system role (Gemma 2) still
    translates, for conversations without one."""
    assert translate(chat_templates.LLAMA3, SPECIAL).stops("<|im_end|>") == ["<|eot_id|>", "<|im_end|>"]
    assert translate(chat_templates.SMOLLM2, SPECIAL).stops("<|im_end|>") == ["<|im_end|>"]
    go = translate(chat_templates.GEMMA2, SPECIAL).template
    want = _hf(tokenizer, chat_templates.GEMMA2, CONVERSATION[1:], True)
    assert render(go, ollama_messages(CONVERSATION[1:])) == want


@pytest.mark.parametrize(("template", "named"), [
    ("{{ strftime_now('%Y') }}{% for m in messages %}{{ m['content'] }}{% endfor %}", "strftime_now"),
    ("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}", "verbatim"),
    ("{% for m in messages %}{% if loop.index0 % 3 == 2 %}!{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
     "{% endfor %}", "differ at character"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %", "not valid Jinja"),
])
def test_untranslatable_templates_are_refused(template, named):
    with pytest.raises(UntranslatableTemplate, match=named):
        translate(template, SPECIAL)


def test_go_renderer_semantics():
    """The renderer follows Go's text/template: trim markers, else-if chains, scoped variables, and/or values."""
    data = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}], "System": ""}
    tpl = ("{{- $n := 0 }}{{ range $i, $m := .Messages }}{{ $n = $i }}{{ if eq .Role \"user\" }}U:{{ .Content }}"
           "{{ else if eq .Role \"x\" }}X{{ else }}A:{{ $m.Content }}{{ end }} {{ end -}}\n\n"
           "{{ $n }}|{{ or .System \"none\" }}|{{ and 1 0 }}|{{ len (slice .Messages 1) }}|"
           "{{ (index .Messages 0).Role }}")
    assert render(tpl, data) == "U:a A:b 1|none|0|1|user"
    with pytest.raises(GoTemplateError):
        render("{{ with .System }}x{{ end }}", data)
