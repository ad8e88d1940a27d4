"""RMSNorm kernel (forward and hand-written backward) against autograd of the naive float64 formula."""

from __future__ import annotations

import pytest
import torch
from quantforge.kernels import rmsnorm
from quantforge.kernels._launch import use_triton


def naive(x, w, eps, offset):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def within_bf16(out, ref):
    """Each element within one bf16 rounding step (2^-8 relative) of the float64 reference."""
    err = (out.double() - ref).abs()
    bound = 2.0 ** -8 * ref.abs() + 1e-6 * ref.abs().max()
    return bool((err <= bound).all()), (err / (ref.abs() + 1e-30)).max().item()


def grads(fn, x, w, dy):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def test_triton_path_selected():
    assert use_triton(torch.zeros(1))


@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 33), (7, 100)], ids=str)
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_fp32_matches_naive(shape, offset):
    x = torch.randn(shape)
    w = torch.randn(shape[-1]) * 0.3 + (0.0 if offset else 1.0)
    dy = torch.randn(shape)
    eps = 1e-6
    y, dx, dw = grads(lambda a, b: rmsnorm.rms_norm(a, b, eps, offset), x, w, dy)
    ry, rdx, rdw = grads(lambda a, b: naive(a, b, eps, offset), x.double(), w.double(), dy.double())
    assert rel(y, ry) < 1e-6
    assert rel(dx, rdx) < 1e-5
    assert rel(dw, rdw) < 1e-5


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_bf16_within_rounding_of_fp64(offset):
    x = torch.randn(9, 71).bfloat16()
    w = (torch.randn(71) * 0.3 + (0.0 if offset else 1.0)).bfloat16()
    dy = torch.randn(9, 71).bfloat16()
    y, dx, dw = grads(lambda a, b: rmsnorm.rms_norm(a, b, 1e-5, offset), x, w, dy)
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    ry, rdx, rdw = grads(lambda a, b: naive(a, b, 1e-5, offset), x.double(), w.double(), dy.double())
    for out, ref in ((y, ry), (dx, rdx), (dw, rdw)):
        ok, worst = within_bf16(out, ref)
        assert ok, worst


def test_frozen_weight_and_strided_input():
    """A frozen weight gets no gradient; a row-strided view of x is read in place and its grad is right."""
    base = torch.randn(6, 40)
    w = torch.randn(24)
    x = base[:, 8:32].clone().requires_grad_(True)
    y = rmsnorm.rms_norm(x, w, 1e-6)
    y.square().sum().backward()
    xr = x.detach().double().requires_grad_(True)
    naive(xr, w.double(), 1e-6, 0.0).square().sum().backward()
    assert rel(x.grad, xr.grad) < 1e-5
    view = base[:, 8:32]
    assert rel(rmsnorm.rms_norm(view, w, 1e-6), naive(view.double(), w.double(), 1e-6, 0.0)) < 1e-6


def test_reference_matches_naive():
    x, w = torch.randn(4, 16), torch.randn(16)
    assert rel(rmsnorm.rms_norm_reference(x, w, 1e-6, 1.0), naive(x.double(), w.double(), 1e-6, 1.0)) < 1e-6
