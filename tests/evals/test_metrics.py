"""Pure metric math (no models): chunking, KLD, top-1, percentiles, perplexity, llama.cpp's 16-bit base."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from quantforge.evals import metrics

from quantforge.errors import InputError


def test_chunks_follow_llama_perplexity():
    tokens = list(range(100, 1100))
    chunks = metrics.make_chunks(tokens, 256, None, bos_id=None)
    assert len(chunks) == 3 and chunks[1] == tokens[256:512]
    with_bos = metrics.make_chunks(tokens, 256, 2, bos_id=1)
    assert len(with_bos) == 2
    assert with_bos[1][0] == 1 and with_bos[1][1:] == tokens[257:512]
    assert metrics.scored_rows(512) == slice(256, 511)
    assert metrics.scored_targets(list(range(512))) == list(range(257, 512))
    assert len(metrics.scored_targets(list(range(512)))) == 255
    with pytest.raises(InputError, match="fewer than one"):
        metrics.make_chunks(tokens[:100], 256)
    with pytest.raises(InputError, match="even"):
        metrics.make_chunks(tokens, 255)


def test_kld_of_a_model_against_itself_is_zero():
    logits = torch.randn(40, 1000) * 4
    lp = metrics.log_softmax(logits)
    assert torch.equal(metrics.kl_divergence(lp, lp), torch.zeros(40, dtype=torch.float64))
    stats = metrics.DistributionStats()
    stats.add(logits, torch.randint(0, 1000, (40,)).tolist(), lp)
    s = stats.summary()
    assert s["kld_mean"] == 0 and s["kld_p99"] == 0 and s["top1"] == 1.0 and s["ppl"] == s["ppl_base"]


def test_kld_matches_direct_formula_with_floor():
    gen = torch.Generator().manual_seed(1)
    p_logits = torch.randn(8, 300, generator=gen) * 6
    q_logits = p_logits + torch.randn(8, 300, generator=gen)
    lp, lq = metrics.log_softmax(p_logits), metrics.log_softmax(q_logits)
    full = (lp.exp() * (lp - lq)).sum(-1)
    kept = torch.where(lp > -16, lp.exp() * (lp - lq), torch.zeros_like(lp)).sum(-1)
    assert torch.allclose(metrics.kl_divergence(lp, lq), kept)
    # the floor only drops entries with p < e^-16: a difference far below the values themselves
    assert torch.allclose(kept, full, atol=1e-5)
    assert (metrics.kl_divergence(lp, lq) >= 0).all()


def test_top1_uses_first_index_on_ties():
    base = torch.tensor([[1.0, 3.0, 3.0], [0.0, 0.0, 1.0]])
    other = torch.tensor([[1.0, 3.0, 2.0], [0.0, 2.0, 1.0]])
    assert metrics.same_top(base, other).tolist() == [True, False]


def test_percentile_matches_numpy_linear():
    values = sorted(np.random.default_rng(0).random(997).tolist())
    for frac in (0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0):
        assert metrics.percentile(values, frac) == pytest.approx(np.percentile(values, 100 * frac), rel=1e-12)


def test_perplexity_is_exp_of_mean_nll_with_llama_error():
    nll = [2.0, 3.0, 2.5, 4.0]
    ppl, err = metrics.perplexity(nll)
    mean = sum(nll) / 4
    assert ppl == pytest.approx(math.exp(mean))
    sd = math.sqrt((sum(x * x for x in nll) / 4 - mean**2) / 3)
    assert err == pytest.approx(ppl * sd)


def test_stats_nll_matches_cross_entropy():
    logits = torch.randn(30, 500) * 3
    targets = torch.randint(0, 500, (30,))
    stats = metrics.DistributionStats()
    stats.add(logits, targets.tolist())
    ce = torch.nn.functional.cross_entropy(logits.double(), targets)
    assert stats.summary()["ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-12)
    assert "kld_mean" not in stats.summary()


def test_llamacpp_base_roundtrip_is_16_bit_log_softmax():
    logits = torch.randn(16, 2000) * 5
    exact = torch.log_softmax(logits.double(), -1)
    decoded = metrics.llamacpp_base_roundtrip(logits).double()
    kept = exact > exact.max(-1, keepdim=True).values - 15.9
    # one code step is (max - min) / 65535 <= 16 / 65535; float32 arithmetic adds ~1e-5
    assert (decoded - exact)[kept].abs().max() < 16 / 65535 / 2 + 2e-5
    # entries at or below max - 16 all decode to the same floor value
    low = logits <= logits.max(-1, keepdim=True).values - 16
    if low.any():
        rows = low.any(-1).nonzero()[:, 0]
        for r in rows.tolist():
            assert decoded[r][low[r]].unique().numel() == 1


def test_shape_mismatch_is_a_clear_error():
    stats = metrics.DistributionStats()
    with pytest.raises(InputError, match="vocabulary"):
        stats.add(torch.randn(4, 10), [1, 2, 3, 4], metrics.log_softmax(torch.randn(4, 12)))
