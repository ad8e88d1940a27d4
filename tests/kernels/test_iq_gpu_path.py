"""The Triton steps of the lattice i-quants' GPU path (row sums, the neighbour search of ``snap``, the coordinate
descent of ``make_qp_quants``) give the PyTorch reference's values, and IQ2_XXS through them gives its bytes.

The GPU path is selected by :func:`quantforge.kernels._iq_common.on_gpu`; here it is switched on for CPU tensors,
whose Triton kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from quantforge.kernels import _cpu_fast, _iq_common, iq2_xxs
from quantforge.kernels._iq_grids import search_tables


def _heavy(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))


@pytest.mark.parametrize("n", [16, 32])
def test_rowsum_triton_is_the_sequential_sum(n):
    t = _heavy((300, n), 1)
    ref = _iq_common.seqsum(t.t().contiguous())
    assert torch.equal(_iq_common.rowsum_triton(t), ref)


@pytest.mark.parametrize("lattice,nwant,kmax", [("iq2_256", 2, 3), ("iq3_256", 2, 8)])
def test_snap_neighbour_search_triton_equals_reference(lattice, nwant, kmax, monkeypatch):
    t = search_tables(lattice, nwant, kmax - 1)
    g = torch.Generator().manual_seed(5)
    B, n = 24, 32
    xval = torch.rand(B, n, generator=g) * 0.05
    waux = torch.rand(B, n, generator=g) * torch.exp(torch.randn(B, n, generator=g))
    waux[0] = 1.0  # equal weights: distance ties, where the first neighbour must win
    inv = (2 * kmax - 1) / xval.amax(dim=1)
    scale = 1.0 / inv
    ref = _iq_common.snap(t, xval, waux, inv, scale, kmax)
    assert int((~ref[2]).sum()) > B  # many groups off the lattice
    monkeypatch.setattr(_iq_common, "on_gpu", lambda x: True)
    got = _iq_common.snap(t, xval, waux, inv, scale, kmax)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)


def test_qp_scale_descent_triton_equals_reference(monkeypatch):
    x = _heavy((70, 32), 2) * 0.01
    w = _heavy((70, 32), 3).abs()
    xval, _ = _iq_common.fold_signs(x, w)  # rows with one negative value (a code stored as code + 256)
    xval[0] = 0.0
    assert bool((xval < 0).any())
    ref = _iq_common.qp_scale(xval, 4, w)
    monkeypatch.setattr(_iq_common, "on_gpu", lambda t: True)
    got = _iq_common.qp_scale(xval, 4, w)
    assert torch.equal(got, ref)


def test_iq2_xxs_gpu_path_gives_the_reference_bytes(monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 256, generator=g) * 0.02
    w[0, :64] *= torch.exp(2 * torch.randn(64, generator=g))
    w[0, 64:96] = 0.0
    imatrix = torch.rand(256, generator=g) * torch.exp(torch.randn(256, generator=g))
    imatrix[:8] = 0.0
    monkeypatch.setenv(_cpu_fast.ENV, "torch")
    ref = iq2_xxs.quantize(w, imatrix)
    monkeypatch.setattr(_iq_common, "on_gpu", lambda t: True)
    assert torch.equal(iq2_xxs.quantize(w, imatrix), ref)
