"""Q8_0's PyTorch codec (the GPU path) rounds as C's ``roundf`` and divides exactly, like the C kernels and ggml."""

from __future__ import annotations

import math

import torch

from quantforge.kernels import _cpu_fast, q8_0
from quantforge.kernels._blocks import roundf


def _c_roundf(v: float) -> float:
    """``roundf`` of a float32 value, in float64 (where |v| + 0.5 is exact)."""
    return math.copysign(math.floor(abs(v) + 0.5), v)


def test_roundf_is_half_away_from_zero_without_the_add_half_error():
    edge = [0.49999997, -0.49999997, 0.5, -0.5, 1.5, -1.5, 2.5, 126.5, -126.5, 3.4999998, 0.0, 1e-30]
    x = torch.cat([torch.tensor(edge), torch.randn(4096) * 60, torch.randint(-200, 200, (512,)) + 0.5])
    got = roundf(x).tolist()
    assert got == [_c_roundf(v) for v in x.tolist()]
    assert got[0] == 0.0  # floor(0.49999997 + 0.5) would give 1


def test_reference_codec_equals_c_kernel_on_ties_and_random_blocks(monkeypatch):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[0, :32] = torch.linspace(-1, 1, 32)
    w[0, 0], w[0, 1], w[0, 2] = 127.0, 0.49999997, -2.5  # amax 127: d = 1, so the codes are the values rounded
    monkeypatch.setenv(_cpu_fast.ENV, "torch")
    ref = q8_0.quantize(w)
    assert ref[0, 2 + 1].view(torch.int8).item() == 0 and ref[0, 2 + 2].view(torch.int8).item() == -3
    monkeypatch.setenv(_cpu_fast.ENV, "c")
    if _cpu_fast.library() is not None:
        assert torch.equal(q8_0.quantize(w), ref)
