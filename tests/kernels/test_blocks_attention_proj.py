"""The QKV projection block (hand-written backward, optional in-place RoPE) against autograd of the naive float64
formula over the dequantized base weights and against its PyTorch reference: NF4, Q4_K, Q8_0 and bf16 bases,
grouped-query shapes (3 query heads, 1 key/value head), odd widths, M = 1, packed position ids, biases, partial
and frozen adapters, both the fused path and the dequantize-to-buffer path."""

from __future__ import annotations

import math

import pytest
import torch
from quantforge.kernels import attention_proj
from quantforge.kernels.attention_proj import lora_qkv, lora_qkv_reference
from quantforge.kernels.mlp import LoraProjection
from quantforge.kernels.qweight import QuantWeight

from quantforge.errors import InputError

HEAD_DIM, N_Q, N_KV, R, THETA = 10, 3, 1, 4, 10000.0
#: in_features per format: whole blocks, and for Q8_0 / bf16 not a multiple of the kernels' 64-wide K tile.
HIDDEN = {"nf4": 64, "q4_k": 256, "q8_0": 96, "bf16": 44}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(fmt, hidden, dtype=torch.float32, adapters=(True, True, True), biases=(True, True, False)):
    projs = []
    for out_f, has, has_bias in zip((N_Q * HEAD_DIM, N_KV * HEAD_DIM, N_KV * HEAD_DIM), adapters, biases,
                                    strict=True):
        w = QuantWeight.quantize(torch.randn(out_f, hidden) / math.sqrt(hidden), fmt)
        a = (torch.randn(R, hidden) / math.sqrt(hidden)).to(dtype).requires_grad_() if has else None
        b = (torch.randn(out_f, R) * 0.5).to(dtype).requires_grad_() if has else None
        bias = (torch.randn(out_f) * 0.1).to(dtype).requires_grad_() if has_bias else None
        projs.append(LoraProjection(w, a, b, 2.0, bias))
    return projs


def leaves(projs):
    return [t for p in projs for t in (p.lora_a, p.lora_b, p.bias) if t is not None]


def as64(projs):
    """The same projections with float64 leaf copies (grads tracked where the originals track them)."""
    def cp(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

    return [LoraProjection(p.weight, cp(p.lora_a), cp(p.lora_b), p.scale, cp(p.bias)) for p in projs]


def naive64(x, projs, position_ids=None):
    """Float64: x W^T + s (x A^T) B^T + bias per projection, then rotate_half RoPE of q and k per head."""
    ys = []
    for p in projs:
        y = x @ p.weight.dequantize(torch.float32).double().t()
        if p.lora_a is not None:
            y = y + p.scale * (x @ p.lora_a.t()) @ p.lora_b.t()
        ys.append(y if p.bias is None else y + p.bias)
    if position_ids is None:
        return tuple(ys)
    inv = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    ang = position_ids.double()[..., None] * inv
    cos, sin = torch.cat((ang, ang), -1).cos()[..., None, :], torch.cat((ang, ang), -1).sin()[..., None, :]

    def rot(t):
        h = t.view(*t.shape[:-1], -1, HEAD_DIM)
        half = HEAD_DIM // 2
        return (h * cos + torch.cat((-h[..., half:], h[..., :half]), -1) * sin).reshape(t.shape)

    return rot(ys[0]), rot(ys[1]), ys[2]


def run(fn, x, projs, dys, x_grad=True):
    """Outputs, dx and the leaves' grads of ``sum_i <fn(x)_i, dy_i>``."""
    x = x.clone().requires_grad_(x_grad)
    for t in leaves(projs):
        t.grad = None
    outs = fn(x, projs)
    torch.autograd.backward(outs, dys)
    return [o.detach() for o in outs], x.grad, [t.grad for t in leaves(projs)]


def ours(position_ids=None):
    def fn(x, projs):
        if position_ids is None:
            return lora_qkv(x, *projs)
        return lora_qkv(x, *projs, head_dim=HEAD_DIM, position_ids=position_ids, theta=THETA)
    return fn


def reference(position_ids=None):
    def fn(x, projs):
        if position_ids is None:
            return lora_qkv_reference(x, *projs)
        return lora_qkv_reference(x, *projs, head_dim=HEAD_DIM, position_ids=position_ids, theta=THETA)
    return fn


def grad_outputs(lead, dtype=torch.float32):
    return [torch.randn(*lead, n * HEAD_DIM).to(dtype) for n in (N_Q, N_KV, N_KV)]


def assert_close(got, want, tol):
    (y, dx, dl), (ry, rdx, rdl) = got, want
    assert all(rel(a, b) < tol for a, b in zip(y, ry, strict=True))
    assert dx is None or rel(dx, rdx) < tol
    assert all((a is None) == (b is None) for a, b in zip(dl, rdl, strict=True))
    assert all(rel(a, b) < tol for a, b in zip(dl, rdl, strict=True) if a is not None)


@pytest.mark.parametrize("fmt", ["nf4", "q4_k", "q8_0", "bf16"])
def test_fp32_matches_naive(fmt):
    """Packed positions (3 + 4 tokens), RoPE, biases on q and k. Measured: at most 3e-7 relative to float64 and to
    autograd of the reference, outputs and every gradient."""
    hidden = HIDDEN[fmt]
    projs = make(fmt, hidden)
    pos = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    x, dys = torch.randn(7, hidden), grad_outputs((7,))
    got = run(ours(pos), x, projs, dys)
    assert_close(got, run(lambda a, p: naive64(a, p, pos), x.double(), as64(projs), [d.double() for d in dys]),
                 1e-5)
    assert_close(got, run(reference(pos), x, projs, dys), 1e-5)


@pytest.mark.parametrize("lead,pos", [((1,), torch.tensor([5])), ((2, 3), torch.tensor([[0, 1, 2], [0, 1, 0]])),
                                      ((4,), None)], ids=["m1", "batched", "no-rope"])
def test_shapes(lead, pos):
    projs = make("q8_0", HIDDEN["q8_0"])
    x, dys = torch.randn(*lead, HIDDEN["q8_0"]), grad_outputs(lead)
    got = run(ours(pos), x, projs, dys)
    assert all(o.shape == d.shape for o, d in zip(got[0], dys, strict=True))
    assert_close(got, run(lambda a, p: naive64(a, p, pos), x.double(), as64(projs), [d.double() for d in dys]),
                 1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "transient"])
def test_partial_frozen_adapters_and_frozen_input(fused, monkeypatch):
    """q with adapters, k without, v with a frozen lora_b and a frozen bias, and x without grad (the first layer
    over frozen embeddings): grads exactly where autograd of the reference gives them, no dx."""
    if not fused:
        monkeypatch.setattr(attention_proj, "use_fused", lambda *args: False)
    projs = make("nf4", HIDDEN["nf4"], adapters=(True, False, True), biases=(False, True, True))
    projs[2].lora_b.requires_grad_(False)
    projs[2].bias.requires_grad_(False)
    pos = torch.tensor([0, 1, 2, 3, 0])
    x, dys = torch.randn(5, HIDDEN["nf4"]), grad_outputs((5,))
    got = run(ours(pos), x, projs, dys, x_grad=False)
    assert got[1] is None
    assert_close(got, run(reference(pos), x, projs, dys, x_grad=False), 1e-5)


def test_transient_path_matches_naive(monkeypatch):
    """The dequantize-to-buffer path (many tokens on CUDA): one GEMM over x for the three x A^T, base products
    accumulated into one dx."""
    monkeypatch.setattr(attention_proj, "use_fused", lambda *args: False)
    projs = make("q4_k", HIDDEN["q4_k"])
    pos = torch.tensor([[3, 4, 5], [0, 1, 2]])
    x, dys = torch.randn(2, 3, HIDDEN["q4_k"]), grad_outputs((2, 3))
    got = run(ours(pos), x, projs, dys)
    assert_close(got, run(lambda a, p: naive64(a, p, pos), x.double(), as64(projs), [d.double() for d in dys]),
                 1e-5)


def test_bf16_close_to_fp64():
    """bf16 activations, adapters and base: every product is a bf16 GEMM with float32 accumulation, each output
    rounded to bf16 (2^-8 relative), RoPE in float32 rounded once. Measured over six seeds, worst output or grad
    relative to float64: 7.7e-3 through the block (fused kernels under the CPU interpreter, whose float32 -> bf16
    stores truncate), 4.3e-3 through autograd of the reference; the bound is twice the first."""
    projs = make("bf16", HIDDEN["bf16"], dtype=torch.bfloat16)
    pos = torch.tensor([0, 1, 2, 3, 4, 0])
    x, dys = torch.randn(6, HIDDEN["bf16"]).bfloat16(), grad_outputs((6,), torch.bfloat16)
    got = run(ours(pos), x, projs, dys)
    assert all(t.dtype == torch.bfloat16 for t in [*got[0], got[1], *got[2]])
    want = run(lambda a, p: naive64(a, p, pos), x.double(), as64(projs), [d.double() for d in dys])
    assert_close(got, want, 2.0 ** -6)


def test_saves_only_input_adapters_and_lora_activations():
    """What outlives the forward: x, the six adapter matrices, the three (M, r) x A^T, the position ids and the
    frequencies; never a projection output or a 16-bit copy of a base weight (the reference keeps those)."""
    projs = make("nf4", HIDDEN["nf4"], biases=(False, False, False))
    pos = torch.arange(9)
    x = torch.randn(9, HIDDEN["nf4"], requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_qkv(x, *projs, head_dim=HEAD_DIM, position_ids=pos, theta=THETA)
    adapters = [tuple(t.shape) for p in projs for t in (p.lora_a, p.lora_b)]
    assert sorted(saved) == sorted([tuple(x.shape), *adapters, (9, R), (9, R), (9, R), (9,), (HEAD_DIM // 2,)])
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_qkv_reference(x, *projs, head_dim=HEAD_DIM, position_ids=pos, theta=THETA)
    assert (HIDDEN["nf4"], N_Q * HEAD_DIM) in saved  # autograd of F.linear keeps W^T


def test_rejects_bad_inputs():
    projs = make("nf4", HIDDEN["nf4"])
    x = torch.randn(2, HIDDEN["nf4"])
    with pytest.raises(InputError, match="n_kv"):
        lora_qkv(x, projs[0], projs[1], projs[0])
    with pytest.raises(InputError, match="head_dim"):
        lora_qkv(x, *projs, head_dim=4, position_ids=torch.arange(2), theta=THETA)
    with pytest.raises(InputError, match="theta"):
        lora_qkv(x, *projs, head_dim=HEAD_DIM, position_ids=torch.arange(2))
    with pytest.raises(InputError, match="bias"):
        lora_qkv(x, LoraProjection(projs[0].weight, bias=torch.zeros(3)), projs[1], projs[2])
