"""The Triton Q6_K and Q8_0 quantize kernels (the CUDA paths) give the reference codecs' bytes.

Run on the CPU under ``TRITON_INTERPRET=1`` (tests/conftest.py). Q6_K with and without an imatrix (zeros and a
wide range of importances among its values): sub-blocks and whole super-blocks that are all zero, sub-blocks of
one repeated value, of alternating signs of one magnitude (the first-of-ties rule of the signed maximum),
heavy-tailed rows, one outlier over tiny weights, small integer grids; Q8_0 on C ``roundf``'s exact ties,
0.49999997 (which ``floor(v + 0.5)`` rounds the wrong way), all-zero blocks and heavy tails. The row counts leave
the last program partly empty.
"""

from __future__ import annotations

import pytest
import torch
from quantforge.kernels import _cpu_fast, q6_k, q8_0

from quantforge.errors import UnsupportedFormat


def _q6_weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(q6_k.BLOCK_S // 2 + 3, 512, generator=g) * 0.02
    w[0, :16] = 0.0
    w[0, 256:] = 0.0
    w[1, 32:48] = -0.5
    w[2, 64:96] = torch.rand(32, generator=g) + 0.1
    w[3] = torch.randn(512, generator=g) * torch.exp(3 * torch.randn(512, generator=g))
    w[4, :256] = torch.randn(256, generator=g) * 1e-3
    w[4, 7] = 40.0
    w[5, :16] = torch.tensor([1.0, -1.0] * 8)
    w[6, :256] = torch.randint(-3, 4, (256,), generator=g).float() * 0.01
    return w


def _mismatch(got: torch.Tensor, ref: torch.Tensor) -> str:
    return f"rows {(got != ref).any(dim=1).nonzero().flatten().tolist()} differ"


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_q6_k_triton_equals_reference(with_imatrix, monkeypatch):
    w = _q6_weights()
    imatrix = None
    if with_imatrix:
        g = torch.Generator().manual_seed(11)
        imatrix = torch.rand(512, generator=g) * torch.exp(2 * torch.randn(512, generator=g))
        imatrix[:20] = 0.0
    monkeypatch.setenv(_cpu_fast.ENV, "torch")  # the PyTorch reference, not the C kernels
    ref = q6_k.quantize(w, imatrix)
    got = q6_k.quantize_triton(w, imatrix)
    assert torch.equal(got, ref), _mismatch(got, ref)


def test_q6_k_triton_rejects_a_wrong_imatrix_shape():
    with pytest.raises(UnsupportedFormat, match="one value per column"):
        q6_k.quantize_triton(torch.zeros(2, 256), torch.ones(512))


def test_q8_0_triton_equals_reference(monkeypatch):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(q8_0.BLOCK_B // 8 + 5, 256, generator=g) * 0.02
    w[0, :32] = torch.linspace(-1, 1, 32)
    w[0, 0], w[0, 1], w[0, 2] = 127.0, 0.49999997, -2.5  # amax 127: d = 1, the codes are the values rounded
    w[1, :32] = 0.0
    w[2] = torch.randn(256, generator=g) * torch.exp(3 * torch.randn(256, generator=g))
    w[3, :32] = torch.randint(-127, 128, (32,), generator=g).float()
    w[3, :6] = torch.tensor([127.0, 0.5, -0.5, 1.5, -2.5, 126.5])
    monkeypatch.setenv(_cpu_fast.ENV, "torch")
    ref = q8_0.quantize(w)
    got = q8_0.quantize_triton(w)
    assert got[0, 3].view(torch.int8).item() == 0 and got[3, 3].view(torch.int8).item() == 1
    assert torch.equal(got, ref), _mismatch(got, ref)
