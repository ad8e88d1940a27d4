"""The error-feedback block kernel (GPTQ's inner column loop, the CUDA path of ``--optimize gptq``) gives its
PyTorch reference's codes, errors and updated weights bit for bit, on uniform grids (the k-quants' and legacy
types' integer codes) and on a non-uniform one (IQ4_NL's values), at the 256- and 32-column block sizes, with
zero scales and a row count that leaves the last program partly empty. Run under ``TRITON_INTERPRET=1`` on CPU.
"""

from __future__ import annotations

import pytest
import torch

from quantforge.kernels.feedback import feedback_block_reference, feedback_block_triton, nearest_code
from quantforge.rounding.gptq import inverse_factor
from quantforge.rounding.grids import IQ4_VALUES


def _case(B: int, R: int, values: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * B, B, generator=g) @ (torch.eye(B) + 0.3 * torch.randn(B, B, generator=g))
    u = inverse_factor(x.t() @ x / x.shape[0])
    span = float(values[-1] - values[0])
    s = (torch.rand(B, R, generator=g) + 0.5) * 0.02
    s[:, 0] = 0.0  # a row whose block scale is zero
    s[3, 1] = 0.0
    o = -s * float(values[0]) - torch.rand(B, R, generator=g) * 0.01
    w = o + s * (torch.rand(B, R, generator=g) * (span + 2) - 1)  # a little outside the grid at both ends
    w[:, 2] = o[:, 2] + s[:, 2] * (values[0] + 0.5)  # exact ties of the uniform grids
    return w.contiguous(), s, o, u


@pytest.mark.parametrize("B,R", [(256, 37), (32, 200)])
@pytest.mark.parametrize("grid", ["uniform", "iq4"])
def test_kernel_equals_reference(B, R, grid):
    values = torch.arange(16, dtype=torch.float32) if grid == "uniform" else torch.tensor(IQ4_VALUES,
                                                                                          dtype=torch.float32)
    uniform = grid == "uniform"
    w, s, o, u = _case(B, R, values, seed=B + R)
    w_ref, w_k = w.clone(), w.clone()
    codes_ref, err_ref = feedback_block_reference(w_ref, s, o, u, values, uniform)
    codes_k, err_k = feedback_block_triton(w_k, s, o, u, values, uniform)
    assert torch.equal(codes_k, codes_ref), int((codes_k != codes_ref).sum())
    assert torch.equal(err_k, err_ref), float((err_k - err_ref).abs().max())
    assert torch.equal(w_k, w_ref)
    assert int(codes_ref.min()) == 0 and int(codes_ref.max()) == len(values) - 1  # both ends of the grid reached


def test_without_feedback_codes_are_the_nearest_values():
    """With ``U`` the identity no error moves: every code is the plain nearest value, and ``e = w - y``."""
    values = torch.arange(-8, 8, dtype=torch.float32)
    w, s, o, _ = _case(32, 24, values, seed=5)
    w0 = w.clone()
    codes, err = feedback_block_triton(w, s, o, torch.eye(32), values, True)
    safe = torch.where(s != 0, s, torch.ones_like(s))
    want = nearest_code(torch.where(s != 0, (w0 - o) / safe, 0.0), values, True)
    assert torch.equal(codes, want)
    assert torch.equal(w, w0)
    assert torch.equal(err, w0 - (s * values[codes] + o))


@pytest.mark.parametrize("name", ["q4_k", "q6_k", "iq4_nl", "q8_0"])
def test_gptq_rows_through_the_kernel_writes_the_reference_bytes(name, monkeypatch):
    """The whole gptq rounding with its column loop in the kernel (as on CUDA) writes the same bytes as with the
    reference loop (as on the CPU): the block slices of ``U``, the grid values and the scale candidates reach the
    kernel as the reference reads them."""
    from helpers.rounding import correlated_layer

    from quantforge.formats import get_format
    from quantforge.rounding import gptq

    fmt = get_format(name)
    w, x = correlated_layer(512, rows=6, seed=2)
    factor = inverse_factor(x.t() @ x / x.shape[0])
    imatrix = (x * x).mean(dim=0)
    ref = gptq.gptq_rows(w, fmt, factor, imatrix)
    monkeypatch.setattr(gptq, "feedback_block", feedback_block_triton)
    assert torch.equal(gptq.gptq_rows(w, fmt, factor, imatrix), ref)
