"""The MLP block's ``save_gate_up`` option: the forward keeps the gate and up outputs, the backward reads them
instead of recomputing two LoRA linears; values and gradients are those of the default (recomputing) block."""

from __future__ import annotations

import math

import pytest
import torch
from quantforge.kernels import mlp
from quantforge.kernels.mlp import LoraProjection, lora_mlp
from quantforge.kernels.qweight import QuantWeight

HIDDEN, INTER, R = 64, 128, 4


def make(fmt):
    projs = []
    for out_f, in_f in ((INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)):
        w = QuantWeight.quantize(torch.randn(out_f, in_f) / math.sqrt(in_f), fmt)
        a = (torch.randn(R, in_f) / math.sqrt(in_f)).requires_grad_()
        b = (torch.randn(out_f, R) * 0.5).requires_grad_()
        projs.append(LoraProjection(w, a, b, 2.0))
    return projs


def run(x, projs, dy, **kw):
    x = x.clone().requires_grad_()
    leaves = [t for p in projs for t in (p.lora_a, p.lora_b)]
    for t in leaves:
        t.grad = None
    y = lora_mlp(x, *projs, **kw)
    y.backward(dy)
    return [y.detach(), x.grad, *(t.grad for t in leaves)]


@pytest.mark.parametrize("fmt,activation", [("nf4", "swiglu"), ("q8_0", "geglu")])
def test_same_values_without_recomputing(fmt, activation, monkeypatch):
    """Saved gate/up are the tensors the backward would recompute, bit for bit, so every gradient is identical;
    the backward calls no LoRA linear for them (only the default path does, twice)."""
    projs = make(fmt)
    x, dy = torch.randn(2, 3, HIDDEN), torch.randn(2, 3, HIDDEN)
    default = run(x, projs, dy, activation=activation)
    calls = []
    real = mlp.lora_linear

    def counting(*args, **kw):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kw)

    monkeypatch.setattr(mlp, "lora_linear", counting)
    saved = run(x, projs, dy, activation=activation, save_gate_up=True)
    assert len(calls) == 3  # the forward's three projections only
    assert all(torch.equal(a, b) for a, b in zip(saved, default, strict=True))
    calls.clear()
    run(x, projs, dy, activation=activation)
    assert len(calls) == 5


def test_saved_tensors_and_retained_graph():
    """The option adds exactly the two (..., inter) activations to what the forward saves, and leaves them intact,
    so a retained graph backpropagates twice to the same gradients."""
    projs = make("nf4")
    x = torch.randn(5, HIDDEN, requires_grad=True)
    dy = torch.randn(5, HIDDEN)
    shapes = {}
    for save in (False, True):
        found = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, f=found: f.append(tuple(t.shape)) or t, lambda t: t):
            y = lora_mlp(x, *projs, save_gate_up=save)
        shapes[save] = found
    assert sorted(shapes[True]) == sorted(shapes[False] + [(5, INTER), (5, INTER)])
    assert (5, INTER) not in shapes[False]
    y.backward(dy, retain_graph=True)
    first = [x.grad.clone()] + [t.grad.clone() for p in projs for t in (p.lora_a, p.lora_b)]
    y.backward(dy)
    second = [x.grad] + [t.grad for p in projs for t in (p.lora_a, p.lora_b)]
    assert all(torch.allclose(b, 2 * a, rtol=1e-6, atol=1e-6) for a, b in zip(first, second, strict=True))


def test_rejects_projection_bias():
    """``LoraProjection.bias`` serves the attention projections; the MLP block refuses it rather than drop it."""
    from quantforge.errors import InputError

    gate, up, down = make("q8_0")
    with pytest.raises(InputError, match="bias"):
        lora_mlp(torch.randn(2, HIDDEN), LoraProjection(gate.weight, bias=torch.zeros(INTER)), up, down)
