"""SwiGLU / GeGLU kernels (forward and hand-written backward) against autograd of the naive float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch
from quantforge.kernels import glu


def naive(g, u, activation):
    if activation == "swiglu":
        return g * torch.sigmoid(g) * u
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3))) * u


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(fn, g, u, dh):
    g, u = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
    h = fn(g, u)
    h.backward(dh)
    return h.detach(), g.grad, u.grad


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 5, 333)], ids=str)
def test_fp32_matches_naive(activation, shape):
    g = torch.randn(shape) * 3  # wide range: both tanh branches, saturated sigmoid
    u, dh = torch.randn(shape), torch.randn(shape)
    fn = glu.swiglu if activation == "swiglu" else glu.geglu
    h, dg, du = run(fn, g, u, dh)
    rh, rdg, rdu = run(lambda a, b: naive(a, b, activation), g.double(), u.double(), dh.double())
    assert rel(h, rh) < 1e-6 and rel(dg, rdg) < 1e-6 and rel(du, rdu) < 1e-6


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_bf16_within_rounding(activation):
    g, u, dh = (torch.randn(7, 45).bfloat16() for _ in range(3))
    h, dg, du = run(lambda a, b: glu.glu(a, b, activation), g, u, dh)
    rh, rdg, rdu = run(lambda a, b: naive(a, b, activation), g.double(), u.double(), dh.double())
    for out, ref in ((h, rh), (dg, rdg), (du, rdu)):
        assert out.dtype == torch.bfloat16
        err = (out.double() - ref).abs()
        assert (err <= 2.0 ** -8 * ref.abs() + 1e-7).all(), (err / ref.abs()).max()


def test_small_arguments_keep_relative_precision():
    """Tiny gate values (where tanh would cancel) keep float32 relative accuracy."""
    g = torch.logspace(-8, -1, 50) * torch.tensor([1.0, -1.0]).repeat(25)
    u = torch.ones(50)
    for activation in ("swiglu", "geglu"):
        h = glu.glu(g, u, activation)
        ref = naive(g.double(), u.double(), activation)
        assert ((h.double() - ref).abs() / ref.abs()).max() < 1e-6


def test_fused_backward_overwrites_owned_buffers():
    """glu_backward(..., overwrite=True) returns h, dg, du in the dh, gate, up buffers."""
    g, u, dh = torch.randn(4, 9), torch.randn(4, 9), torch.randn(4, 9)
    gd, ud = g.double().requires_grad_(True), u.double().requires_grad_(True)
    ref_h = naive(gd, ud, "geglu")
    ref_h.backward(dh.double())
    bufs = (dh.clone(), g.clone(), u.clone())
    h, dg, du = glu.glu_backward(*bufs, "geglu", want_h=True, overwrite=True)
    assert h.data_ptr() == bufs[0].data_ptr() and dg.data_ptr() == bufs[1].data_ptr()
    assert rel(h, ref_h) < 1e-6 and rel(dg, gd.grad) < 1e-6 and rel(du, ud.grad) < 1e-6


def test_reference_and_errors():
    from quantforge.errors import InputError

    g, u = torch.randn(3, 4), torch.randn(3, 4)
    assert rel(glu.swiglu_reference(g, u), naive(g.double(), u.double(), "swiglu")) < 1e-6
    with pytest.raises(InputError):
        glu.glu(g, u, "relu")
    with pytest.raises(InputError):
        glu.swiglu(g, u[:, :3])
