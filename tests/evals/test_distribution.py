"""PPL / KLD / top-1 on SmolLM2 through the engines: self-KLD 0, PPL against an independent forward, and the
KLD order of our exporter's GGUF mixes (q8_0 < q4_k_m < q2_k)."""

from __future__ import annotations

import math

import pytest
import torch
from quantforge.evals import data, distribution

N_CTX = 128
N_CHUNKS = 2


@pytest.fixture(scope="module")
def text(data_dir):
    return data.wikitext2_test().read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def chunks(hf_engine, text):
    return distribution.prepare_chunks(hf_engine, text, N_CTX, N_CHUNKS)


def test_perplexity_equals_exp_mean_nll_of_direct_forward(hf_engine, text, chunks):
    got = distribution.score(hf_engine, chunks)
    ids = hf_engine.tokenizer(text, add_special_tokens=True).input_ids[: N_CTX * N_CHUNKS]
    nll = []
    with torch.no_grad():
        for c in range(N_CHUNKS):
            x = torch.tensor([ids[c * N_CTX:(c + 1) * N_CTX]])
            logits = hf_engine.model(input_ids=x).logits[0].double()
            half = N_CTX // 2
            nll.append(torch.nn.functional.cross_entropy(logits[half:N_CTX - 1], x[0, half + 1:], reduction="none"))
    nll = torch.cat(nll)
    assert got["n_tokens"] == nll.numel() == N_CHUNKS * (N_CTX // 2 - 1)
    assert got["ppl"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-9)


def test_kld_of_model_against_itself_is_zero(hf_engine, chunks):
    ref = distribution.ReferenceLogits(hf_engine, chunks)
    s = distribution.score(hf_engine, chunks, ref)  # the model runs again: deterministic forwards, KLD exactly 0
    assert s["kld_mean"] == 0.0 and s["kld_max"] == 0.0 and s["top1"] == 1.0
    assert s["ppl"] == s["ppl_base"]
    # the reference row of `quantforge eval` scores the cached reference logits instead of a second forward
    assert distribution.score(hf_engine, chunks, ref, reuse_reference=True) == s


def test_kld_orders_gguf_mixes(hf_engine, smol_gguf, f16_llamacpp, q4_llamacpp, text, chunks):
    """Our exporter's mixes, run by llama.cpp, against the float32 reference on the same 2 x 63 tokens."""
    from quantforge.evals.engines import load_gguf_llamacpp

    ref = distribution.ReferenceLogits(hf_engine, chunks)
    opened = {qtype: load_gguf_llamacpp(smol_gguf(qtype), n_ctx=N_CTX, n_threads=1) for qtype in ("q8_0", "q2_k")}
    engines = {"f16": f16_llamacpp, "q8_0": opened["q8_0"], "q4_k_m": q4_llamacpp, "q2_k": opened["q2_k"]}
    stats = {}
    for qtype, engine in engines.items():
        assert distribution.tokenizer_agrees(hf_engine, engine, text)
        stats[qtype] = distribution.score(engine, chunks, ref)
    for engine in opened.values():
        engine.close()
    kld = {k: v["kld_mean"] for k, v in stats.items()}
    assert kld["f16"] < kld["q8_0"] < kld["q4_k_m"] < kld["q2_k"], kld
    assert kld["f16"] < 1e-4
    assert all(v["n_tokens"] == N_CHUNKS * (N_CTX // 2 - 1) for v in stats.values())
    top1 = {k: v["top1"] for k, v in stats.items()}
    assert top1["q8_0"] >= top1["q4_k_m"] >= top1["q2_k"], top1
