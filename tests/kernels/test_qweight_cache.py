"""The CPU cache of dequantized base weights: the values of ``dequantize``, reused across calls, bounded."""

from __future__ import annotations

import gc

import torch

from quantforge.kernels import qweight
from quantforge.kernels.qweight import QuantWeight, compute_copy


def _weight(seed: int, fmt: str = "q4_k") -> QuantWeight:
    g = torch.Generator().manual_seed(seed)
    return QuantWeight.quantize(torch.randn(8, 256, generator=g), fmt)


def test_copy_equals_dequantize_and_is_reused():
    w = _weight(0)
    first = compute_copy(w, torch.float32)
    assert torch.equal(first, w.dequantize(torch.float32))
    assert compute_copy(w, torch.float32) is first
    assert torch.equal(compute_copy(w, torch.bfloat16), w.dequantize(torch.bfloat16))


def test_cache_stays_within_its_budget(monkeypatch):
    one = 8 * 256 * 4
    monkeypatch.setattr(qweight, "CPU_CACHE_BYTES", 2 * one)
    monkeypatch.setattr(qweight, "_cache", type(qweight._cache)())
    weights = [_weight(i, "q8_0") for i in range(4)]
    copies = [compute_copy(w, torch.float32) for w in weights]
    assert len(qweight._cache) == 2
    assert compute_copy(weights[3], torch.float32) is copies[3]
    assert compute_copy(weights[0], torch.float32) is not copies[0]
    assert torch.equal(compute_copy(weights[0], torch.float32), copies[0])
    monkeypatch.setattr(qweight, "CPU_CACHE_BYTES", one - 1)
    big = _weight(9, "q8_0")
    compute_copy(big, torch.float32)
    assert all(ref() is not big for ref, _ in qweight._cache.values())


def test_a_dead_weight_is_never_served():
    w = _weight(1)
    compute_copy(w, torch.float32)
    key = next(k for k, (ref, _) in qweight._cache.items() if ref() is w)
    del w
    gc.collect()
    other = _weight(2)
    if id(other) == key[0]:
        assert not torch.equal(compute_copy(other, torch.float32), qweight._cache.get(key, (None, None))[1])
    assert torch.equal(compute_copy(other, torch.float32), other.dequantize(torch.float32))
