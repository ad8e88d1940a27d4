"""RoPE kernel (one in-place launch for Q and K) against transformers' Llama rotary embedding and against
autograd of the naive float64 formula, with packed position ids."""

from __future__ import annotations

import pytest
import torch
from quantforge.kernels import rope


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def naive(q, k, pos, inv_freq, scaling=1.0):
    """HF rotate_half convention in float64: x*cos + rotate_half(x)*sin, heads on dim -2."""
    ang = pos.double()[..., None] * inv_freq.double()
    emb = torch.cat((ang, ang), -1)[..., None, :]
    cos, sin = emb.cos() * scaling, emb.sin() * scaling

    def rot(x):
        h = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin

    return rot(q), rot(k)


def packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])


def run(q, k, pos, dq, dk, **kw):
    """Forward + backward through apply_rope on clones (the Triton path rotates in place)."""
    ql, kl = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    qo, ko = rope.apply_rope(ql * 1, kl * 1, pos, **kw)
    torch.autograd.backward((qo, ko), (dq, dk))
    return qo.detach(), ko.detach(), ql.grad, kl.grad


@pytest.mark.parametrize("shape", [("packed", 13, 4, 2, 16), ("batched", 2, 7, 3, 1, 10), ("m1", 1, 1, 1, 6)],
                         ids=lambda s: s[0])
def test_fp32_matches_naive_forward_and_backward(shape):
    if shape[0] == "batched":
        _, B, T, hq, hk, D = shape
        q, k = torch.randn(B, T, hq, D), torch.randn(B, T, hk, D)
        pos = torch.stack([packed_positions([4, 3]), torch.arange(T) + 5])
    else:
        _, T, hq, hk, D = shape
        q, k = torch.randn(T, hq, D), torch.randn(T, hk, D)
        pos = packed_positions([5, 8]) if T == 13 else torch.zeros(T, dtype=torch.long)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    theta = 10000.0
    inv = rope.default_inv_freq(q.shape[-1], theta)
    qo, ko, gq, gk = run(q, k, pos, dq, dk, theta=theta)
    qd, kd = q.double().requires_grad_(True), k.double().requires_grad_(True)
    rq, rk = naive(qd, kd, pos, inv)
    torch.autograd.backward((rq, rk), (dq.double(), dk.double()))
    assert rel(qo, rq) < 1e-6 and rel(ko, rk) < 1e-6
    assert rel(gq, qd.grad) < 1e-6 and rel(gk, kd.grad) < 1e-6


def test_packed_sequences_restart_at_zero():
    """Two packed examples rotate exactly as each would alone."""
    q, k = torch.randn(9, 2, 8), torch.randn(9, 1, 8)
    pos = packed_positions([4, 5])
    qo, ko = rope.apply_rope(q.clone(), k.clone(), pos, 500000.0)
    qa, ka = rope.apply_rope(q[:4].clone(), k[:4].clone(), torch.arange(4), 500000.0)
    qb, kb = rope.apply_rope(q[4:].clone(), k[4:].clone(), torch.arange(5), 500000.0)
    assert torch.equal(qo, torch.cat([qa, qb])) and torch.equal(ko, torch.cat([ka, kb]))


def test_in_place_on_strided_views_of_a_fused_qkv():
    """Q and K as views of one (T, Hq+2Hk, D) buffer are rotated in place; V is untouched."""
    qkv = torch.randn(6, 4 + 2 + 2, 16)
    before = qkv.clone()
    q, k = qkv[:, :4], qkv[:, 4:6]
    pos = torch.arange(6)
    qo, ko = rope.apply_rope(q, k, pos, 10000.0)
    assert qo is q and ko is k
    rq, rk = naive(before[:, :4].double(), before[:, 4:6].double(), pos, rope.default_inv_freq(16, 10000.0))
    assert rel(qkv[:, :4], rq) < 1e-6 and rel(qkv[:, 4:6], rk) < 1e-6
    assert torch.equal(qkv[:, 6:], before[:, 6:])


def test_llama3_scaled_frequencies_match_transformers():
    """Llama-3.1 rope scaling: inv_freq and attention scaling taken from transformers' rotary embedding, and the
    rotated q/k equal transformers' apply_rotary_pos_emb (float32) on packed positions."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=131072,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    emb = LlamaRotaryEmbedding(cfg)
    pos = torch.cat([torch.arange(7), torch.arange(6) + 9000])[None]
    q, k = torch.randn(1, 13, 2, 32), torch.randn(1, 13, 1, 32)
    cos, sin = emb(q, pos)
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    qo, ko = rope.apply_rope(q.clone(), k.clone(), pos, inv_freq=emb.inv_freq,
                             attention_scaling=emb.attention_scaling)
    assert rel(qo, hq.transpose(1, 2)) < 1e-5 and rel(ko, hk.transpose(1, 2)) < 1e-5
    assert emb.inv_freq[-1] < rope.default_inv_freq(32, 500000.0)[-1] / 7  # the scaling really changed them


def test_bf16_within_rounding_and_attention_scaling():
    q, k = torch.randn(11, 3, 12).bfloat16(), torch.randn(11, 1, 12).bfloat16()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    pos = packed_positions([6, 5])
    inv = rope.default_inv_freq(12, 10000.0)
    qo, ko, gq, gk = run(q, k, pos, dq, dk, inv_freq=inv, attention_scaling=1.25)
    qd, kd = q.double().requires_grad_(True), k.double().requires_grad_(True)
    rq, rk = naive(qd, kd, pos, inv, 1.25)
    torch.autograd.backward((rq, rk), (dq.double(), dk.double()))
    for out, ref in ((qo, rq), (ko, rk), (gq, qd.grad), (gk, kd.grad)):
        assert out.dtype == torch.bfloat16
        err = (out.double() - ref.detach()).abs()
        assert (err <= 2.0 ** -8 * ref.detach().abs() + 1e-6).all(), err.max()


def test_reference_path_matches_kernel():
    q, k = torch.randn(2, 5, 2, 8), torch.randn(2, 5, 1, 8)
    pos = torch.arange(5)
    rq, rk = rope.apply_rope_reference(q, k, pos, 10000.0)
    qo, ko = rope.apply_rope(q.clone(), k.clone(), pos, 10000.0)
    assert rel(qo, rq) < 1e-6 and rel(ko, rk) < 1e-6


def test_bad_inputs_raise():
    from quantforge.errors import InputError

    with pytest.raises(InputError):
        rope.apply_rope(torch.randn(4, 2, 7), torch.randn(4, 1, 7), torch.arange(4), 1e4)
    with pytest.raises(InputError):
        rope.apply_rope(torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.arange(5), 1e4)
    with pytest.raises(InputError):
        rope.apply_rope(torch.randn(4, 2, 8), torch.randn(4, 1, 8), torch.arange(4))


def test_autograd_through_views_of_a_fused_qkv_and_leaves():
    """Gradients through q/k sliced from one projection output (views), and through leaf q/k, equal the
    reference's."""
    T, H, K, D = 5, 4, 2, 8
    x = torch.randn(T, 16, requires_grad=True)
    w = torch.randn((H + 2 * K) * D, 16, requires_grad=True)
    pos = packed_positions([2, 3])

    def run_qkv(fn):
        x.grad = w.grad = None
        qkv = (x @ w.t()).view(T, H + 2 * K, D)
        qo, ko = fn(qkv[:, :H], qkv[:, H:H + K], pos, 10000.0)
        loss = (qo.sum(1) * ko.sum(1)).sum() + qkv[:, H + K:].square().sum() + qo.pow(3).sum()
        loss.backward()
        return loss.detach(), x.grad.clone(), w.grad.clone()

    for a, b in zip(run_qkv(rope.apply_rope), run_qkv(rope.apply_rope_reference), strict=True):
        assert rel(a, b) < 1e-6
    q, k = torch.randn(3, 2, 8, requires_grad=True), torch.randn(3, 1, 8, requires_grad=True)
    qo, ko = rope.apply_rope(q, k, torch.arange(3), 10000.0)
    (qo.sum() + 2 * ko.sum()).backward()
    qd, kd = q.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True)
    rq, rk = naive(qd, kd, torch.arange(3), rope.default_inv_freq(8, 10000.0))
    (rq.sum() + 2 * rk.sum()).backward()
    assert rel(q.grad, qd.grad) < 1e-6 and rel(k.grad, kd.grad) < 1e-6
