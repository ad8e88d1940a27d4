"""Tiny random Qwen2, Qwen3, Mistral and Gemma2 checkpoints export to GGUF that llama.cpp loads and runs with the
same logits as transformers. Random weights say nothing about quality, only about the conversion."""

from __future__ import annotations

import pytest

from quantforge.exporters.gguf import export_gguf
from helpers.reference import compare_logits, hf_logits, llama_cpp_logits, tiny_checkpoint, train_spm_tokenizer


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("spm")
    text = out / "train.txt"
    text.write_text((data_dir / "wikitext-2" / "wiki.valid.raw").read_text(encoding="utf-8")[:200_000])
    train_spm_tokenizer(out, text, vocab_size=600)
    return out


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral", "gemma2"])
def test_tiny_arch_loads_and_matches(model_type, tmp_path, smollm2_dir, spm_dir):
    tok_dir = spm_dir if model_type in ("mistral", "gemma2") else smollm2_dir
    ckpt = tiny_checkpoint(model_type, tmp_path / model_type, tok_dir)
    out = export_gguf(ckpt, tmp_path / f"{model_type}.gguf", qtype="f32")
    ids = [1, 5, 17, 42, 99, 123, 256, 300, 7, 8, 9, 10, 11, 12, 200, 150, 180, 400, 20, 30]
    stats = compare_logits(hf_logits(ckpt, ids), llama_cpp_logits(out, ids))
    assert stats["kld"] < 1e-4, stats
    assert stats["top1"] >= 0.95, stats
