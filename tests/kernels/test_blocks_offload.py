"""Offloaded activation checkpointing: on CPU it is plain checkpointing, with gradients equal to running the
layers without it (inputs and parameters, dropout replayed, frozen inputs, non-tensor arguments)."""

from __future__ import annotations

import pytest
import torch
from quantforge.kernels.offload import offloaded_checkpoint


class Layer(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x, scale, bias_vec):
        return x + scale * self.fc2(self.drop(torch.nn.functional.silu(self.fc1(x)))) + bias_vec


def run(layers, x, bias_vec, checkpoint):
    torch.manual_seed(123)
    for p in layers.parameters():
        p.grad = None
    h = x
    for layer in layers:
        h = offloaded_checkpoint(layer, h, 0.5, bias_vec) if checkpoint else layer(h, 0.5, bias_vec)
    loss = (h * torch.linspace(-1, 1, h.shape[-1])).sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in layers.parameters()]


@pytest.mark.parametrize("input_requires_grad", [True, False], ids=["grad-input", "frozen-input"])
def test_gradients_equal_uncheckpointed(input_requires_grad):
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(Layer(16) for _ in range(3))
    x0 = torch.randn(5, 16)
    bias_vec = torch.randn(16, requires_grad=True)
    results = []
    for checkpoint in (False, True):
        x = x0.clone().requires_grad_(input_requires_grad)
        bias_vec.grad = None
        loss, pgrads = run(layers, x, bias_vec, checkpoint)
        results.append((loss, pgrads, x.grad, bias_vec.grad.clone()))
    (l0, p0, x0g, b0), (l1, p1, x1g, b1) = results
    assert torch.equal(l0, l1)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(p0, p1, strict=True))
    assert torch.allclose(b0, b1, rtol=1e-6, atol=1e-7)
    if input_requires_grad:
        assert torch.allclose(x0g, x1g, rtol=1e-6, atol=1e-7)
    else:
        assert x0g is None and x1g is None


def test_no_graph_when_grad_disabled():
    layer = Layer(8)
    with torch.no_grad():
        out = offloaded_checkpoint(layer, torch.randn(2, 8), 1.0, torch.zeros(8))
    assert out.grad_fn is None


def test_non_tensor_output_is_rejected():
    from quantforge.errors import InputError

    with pytest.raises(InputError):
        offloaded_checkpoint(lambda t: (t, t), torch.randn(3, requires_grad=True))
