"""Standard mixes on SmolLM2 against llama.cpp's own quantizer: same per-tensor composition and size,
the file loads in llama.cpp, and mean KL divergence against the float32 HF model on 2,048 WikiText-2 tokens is at
most 1.05x llama.cpp's, on the plain and the dithered SmolLM2 (FIXTURES.md: the plain one alone flatters
grid-aligned types)."""

from __future__ import annotations

import gguf
import pytest

from quantforge.exporters.gguf import export_gguf
from quantforge.presets import get_mix
from helpers.reference import llama_cpp_chunk_logits, quantize_with_llama_cpp

MIXES = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k", "iq4_xs"]
N_CTX, N_CHUNKS = 512, 4


def _types(path):
    r = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name.lower() for t in r.tensors}, sum(int(t.n_bytes) for t in r.tensors)


@pytest.fixture(scope="module", params=["plain", "dithered"])
def variant(request, tmp_path_factory, data_dir):
    """(checkpoint, f16 gguf, token chunks, float32 reference log-probs per chunk) for one SmolLM2 variant."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantforge import fixtures

    ckpt = fixtures.smollm2(request.param)
    f16 = export_gguf(ckpt, tmp_path_factory.mktemp(f"mix-{request.param}") / "f16.gguf", qtype="f16")
    text = (data_dir / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")[:60_000]
    ids = AutoTokenizer.from_pretrained(ckpt)(text)["input_ids"]
    chunks = [ids[i * N_CTX:(i + 1) * N_CTX] for i in range(N_CHUNKS)]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [torch.log_softmax(model(torch.tensor([c])).logits[0].float(), -1) for c in chunks]
    del model
    return ckpt, f16, chunks, ref


def _kld(path, chunks, ref):
    import torch

    total, n = 0.0, 0
    for c, lp, logits in zip(chunks, ref, llama_cpp_chunk_logits(path, chunks)):
        lq = torch.log_softmax(logits.float(), -1)
        total += float((lp.exp() * (lp - lq)).sum(-1).sum())
        n += len(c)
    return total / n


@pytest.mark.parametrize("mix", MIXES)
def test_mix_matches_llama_cpp(variant, mix, tmp_path):
    ckpt, f16, chunks, ref = variant
    ours = export_gguf(ckpt, tmp_path / f"ours-{mix}.gguf", qtype=mix)
    theirs = tmp_path / f"llama-{mix}.gguf"
    quantize_with_llama_cpp(f16, theirs, ftype=get_mix(mix).file_type)
    our_types, our_bytes = _types(ours)
    their_types, their_bytes = _types(theirs)
    assert our_types == their_types
    assert abs(our_bytes - their_bytes) <= 0.005 * their_bytes
    k_ours, k_theirs = _kld(ours, chunks, ref), _kld(theirs, chunks, ref)
    assert k_ours <= 1.05 * k_theirs, (k_ours, k_theirs)
