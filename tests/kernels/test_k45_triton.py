"""The Triton Q4_K/Q5_K quantize kernel (the CUDA path, with and without an imatrix) gives the reference codec's
bytes.

Run on the CPU under ``TRITON_INTERPRET=1`` (tests/conftest.py): sub-blocks that are all zero, all equal and
negative (the search's flat case), all positive, heavy-tailed (scales spanning many binades), and a row count that
leaves the last program partly empty; with an imatrix also zero importances, importances spanning many binades
and a whole zero super-block (the 6-bit scale search's empty case), and the search's coordinate descent moving.
"""

from __future__ import annotations

import pytest
import torch

from quantforge.errors import UnsupportedFormat
from quantforge.kernels import _cpu_fast
from quantforge.kernels.k45 import BLOCK_S, Q4_K, Q5_K


def _weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    rows = BLOCK_S // 2 + 3  # 2 super-blocks a row: one full program and a partial one
    w = torch.randn(rows, 512, generator=g) * 0.02
    w[0, :32] = 0.0
    w[1, 32:64] = -0.5
    w[2, 64:96] = torch.rand(32, generator=g) + 0.1
    w[3] = torch.randn(512, generator=g) * torch.exp(3 * torch.randn(512, generator=g))
    w[4, :256] = torch.randn(256, generator=g) * 1e-3
    w[4, 7] = 40.0
    return w


def _imatrix() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    im = torch.rand(512, generator=g) * torch.exp(2 * torch.randn(512, generator=g))
    im[:20] = 0.0
    return im


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("codec", [Q4_K, Q5_K], ids=lambda c: c.name)
def test_triton_quantize_equals_reference(codec, with_imatrix, monkeypatch):
    w = _weights()
    imatrix = None
    if with_imatrix:
        imatrix = _imatrix()
        w[5, 256:] = 0.0
    monkeypatch.setenv(_cpu_fast.ENV, "torch")  # the PyTorch reference, not the C kernels
    ref = codec.quantize(w, imatrix)
    got = codec.quantize_triton(w, imatrix)
    bad = (got != ref).any(dim=1).nonzero().flatten().tolist()
    assert torch.equal(got, ref), f"{codec.name}: rows {bad} differ"
    if with_imatrix:  # the same bytes as the C kernels (llama.cpp's own code path), and the imatrix mattered
        monkeypatch.setenv(_cpu_fast.ENV, "c")
        assert torch.equal(codec.quantize(w, imatrix), ref)
        assert not torch.equal(codec.quantize(w, None), ref)


def test_triton_quantize_rejects_a_wrong_imatrix_shape():
    with pytest.raises(UnsupportedFormat, match="one value per column"):
        Q4_K.quantize_triton(torch.zeros(2, 256), torch.ones(512))
