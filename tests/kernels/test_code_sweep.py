"""The code-sweep kernel (the tuned rounding's inner column loop, the CUDA path of ``--optimize tune``) gives its
PyTorch reference's codes, steps and gradient bit for bit: full and partial batches (a column count that is not a
power of two), dead blocks, codes at both ends of their range, and a row count that leaves the last program
partly empty. Run under ``TRITON_INTERPRET=1`` on CPU.
"""

from __future__ import annotations

import pytest
import torch

from quantforge.kernels.code_sweep import sweep_codes_reference, sweep_codes_triton


def _case(R: int, n: int, top: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
    h = x.t() @ x / x.shape[0]
    s = (torch.rand(R, n, generator=g) + 0.5) * 0.02
    live = torch.rand(R, n, generator=g) > 0.05
    codes = torch.randint(0, top + 1, (R, n), generator=g)
    codes[0, :8] = 0
    codes[1, :8] = top
    grad = torch.randn(R, n, generator=g) * 0.01 @ h
    return grad.contiguous(), s, live, codes, h


@pytest.mark.parametrize("R,n,b0,b1", [(37, 256, 0, 128), (40, 224, 128, 224), (5, 96, 32, 96)])
def test_kernel_equals_reference(R, n, b0, b1):
    top = 15
    g, s, live, codes, h = _case(R, n, top, seed=R + n)
    g_ref, c_ref = g.clone(), codes.clone()
    d_ref = sweep_codes_reference(g_ref, s, live, c_ref, h, b0, b1, top)
    d_k = sweep_codes_triton(g, s, live, codes, h, b0, b1, top)
    assert torch.equal(d_k, d_ref), float((d_k - d_ref).abs().max())
    assert torch.equal(codes, c_ref), int((codes != c_ref).sum())
    assert torch.equal(g, g_ref), float((g - g_ref).abs().max())
    moved = c_ref != _case(R, n, top, seed=R + n)[3]
    assert bool(moved.any()) and not bool(moved[:, :b0].any()) and not bool(moved[:, b1:].any())
    assert int(c_ref.min()) >= 0 and int(c_ref.max()) <= top


def test_kernel_rejects_a_strided_gradient():
    g, s, live, codes, h = _case(8, 64, 15, seed=1)
    from quantforge.errors import InputError

    with pytest.raises(InputError, match="contiguous"):
        sweep_codes_triton(g.t().contiguous().t(), s, live, codes, h, 0, 64, 15)


@pytest.mark.parametrize("name", ["q4_k", "q8_0"])
def test_tune_rows_through_the_kernel_writes_the_reference_bytes(name, monkeypatch):
    """The whole tuned rounding with its sweeps in the kernel (as on CUDA) writes the same bytes as with the
    reference loop (as on the CPU)."""
    from helpers.rounding import correlated_layer

    from quantforge.formats import get_format
    from quantforge.rounding import tune

    fmt = get_format(name)
    w, x = correlated_layer(512, rows=6, seed=3)
    h = x.t() @ x / x.shape[0]
    start = fmt.quantize(w, (x * x).mean(dim=0) if fmt.takes_imatrix else None)
    ref = tune.tune_rows(w, fmt, h, start)
    monkeypatch.setattr(tune, "sweep_codes", sweep_codes_triton)
    assert torch.equal(tune.tune_rows(w, fmt, h, start), ref)
    assert not torch.equal(ref, start)
