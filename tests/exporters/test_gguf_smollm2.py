"""SmolLM2 exported to GGUF loads in llama.cpp and matches the HF model."""

from __future__ import annotations

import hashlib

import pytest

from quantforge.exporters.gguf import export_gguf
from helpers.reference import (
    compare_logits,
    hf_logits,
    llama_cpp_logits,
    llama_cpp_tokenize,
    quantize_with_llama_cpp,
)

PROMPT = (
    "<|im_start|>user\nWrite two sentences about the history of Paris, France.<|im_end|>\n<|im_start|>assistant\n"
    "Paris grew from a Celtic settlement on the Seine into the capital of France. In 1889 the Eiffel Tower "
    "was built for the World's Fair."
)

TOKENIZER_CASES = [
    "Hello world",
    "  leading spaces and trailing   ",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "Numbers 1234567890 and 3.14159 and 1,000,000",
    "Ünïcödé: café, naïve, Straße, Москва, 東京, 서울, العربية",
    "emoji 😀🚀👍🏽 and symbols ©®™ ∑∫√",
    "tabs\tand\nnewlines\r\nmixed\n\n\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "<|endoftext|>after end of text",
    "    indented code block\n        deeper",
    "URL: https://example.com/path?query=1&x=y#frag",
    "email me at someone@example.org!!!",
    "CamelCaseIdentifier snake_case_identifier kebab-case-identifier",
    "SHOUTING WORDS AND lowercase words",
    "it's don't we'll they're I'm you've",
    "a" * 50,
    "    ",
    "\n",
    "$$\\frac{a}{b} = \\sqrt{x^2 + y^2}$$",
    "JSON: {\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "Mixed 中文 and English text 与 数字 123",
    "Ελληνικά κείμενα και עברית",
    "hyphen-ated words — em dash – en dash",
    "<html><body><p class='x'>Hi</p></body></html>",
    "SELECT * FROM users WHERE id = 42;",
    "multiple     spaces     between",
    "trailing newline\n",
    "?!.,;:'\"()[]{}",
    "The year 2024 had 366 days.",
]


def test_f16_matches_hf_float32(smollm2_dir, smollm2_gguf_f16):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2_dir)(PROMPT)["input_ids"]
    assert 50 <= len(ids) <= 80
    stats = compare_logits(hf_logits(smollm2_dir, ids), llama_cpp_logits(smollm2_gguf_f16, ids))
    assert stats["top1"] == 1.0
    assert stats["max_diff"] < 0.1
    assert stats["kld"] < 1e-4


def test_q8_0_close_to_llama_cpp_q8_0(smollm2_dir, smollm2_gguf_f16, tmp_path):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2_dir)(PROMPT)["input_ids"]
    ours = export_gguf(smollm2_dir, tmp_path / "ours-q8_0.gguf", qtype="q8_0")
    theirs = tmp_path / "llama-q8_0.gguf"
    quantize_with_llama_cpp(smollm2_gguf_f16, theirs, ftype=7)
    ref = hf_logits(smollm2_dir, ids)
    s_ours = compare_logits(ref, llama_cpp_logits(ours, ids))
    s_theirs = compare_logits(ref, llama_cpp_logits(theirs, ids))
    assert s_ours["top1"] >= 0.95
    assert s_ours["kld"] <= 1.1 * s_theirs["kld"]


def test_tokenizer_matches_hf(smollm2_dir, smollm2_gguf_f16):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    expected = [tok(t, add_special_tokens=False)["input_ids"] for t in TOKENIZER_CASES]
    got = llama_cpp_tokenize(smollm2_gguf_f16, TOKENIZER_CASES)
    for text, e, g in zip(TOKENIZER_CASES, expected, got):
        assert g == e, f"tokenization differs for {text!r}"


def test_chat_template_is_in_file_and_renders(smollm2_dir, smollm2_gguf_f16):
    import gguf
    import jinja2
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(str(smollm2_gguf_f16))
    template = reader.fields["tokenizer.chat_template"].contents()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert template == tok.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
    assert rendered == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in rendered


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_reexport_is_byte_identical(smollm2_dir, tmp_path, qtype):
    a = export_gguf(smollm2_dir, tmp_path / "a.gguf", qtype=qtype)
    b = export_gguf(smollm2_dir, tmp_path / "b.gguf", qtype=qtype)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
    assert digest[0] == digest[1]
