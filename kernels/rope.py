"""Rotary position embedding for Q and K in one launch, in place, from per-token position ids.

Convention: Hugging Face's "rotate_half" (non-interleaved) layout as in transformers' Llama: for head dim ``D``
and ``i < D/2``, with ``a = pos * inv_freq[i]``::

    y[i]       = s * (x[i] * cos(a) - x[i + D/2] * sin(a))
    y[i + D/2] = s * (x[i + D/2] * cos(a) + x[i] * sin(a))

``s`` is the rope type's ``attention_scaling`` (1 for plain and Llama-3 scaling). ``inv_freq`` is either derived
from ``theta`` (``1 / theta^(2i/D)``) or passed in as computed by the model's rope type (e.g. Llama-3's scaled
frequencies). Positions are per token, so packed sequences simply restart at 0. Angles are float32
(``pos * inv_freq``, as transformers computes them) and so is the rotation; the result is rounded once.

Tensors: ``q (T, Hq, D)``, ``k (T, Hk, D)`` with ``position_ids (T,)``, or ``q (B, T, Hq, D)``, ``k (B, T, Hk, D)``
with ``position_ids (B, T)`` or ``(T,)``. Any strides with a unit last-dim stride (e.g. views of a fused QKV
output). The rotation is orthogonal up to ``s``, so the backward is the same kernel rotating by ``-a``; the
autograd Function saves only the position ids and the frequencies.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ._launch import pow2, use_triton
from ._triton import HAVE_TRITON, tl, triton

if HAVE_TRITON:
    from ._launch import cast_rtne

    @triton.jit
    def _rotate_heads(X, base, stride_h, H, cos, sin, d, dmask, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        h = tl.arange(0, BLOCK_H)
        offs = base + h[:, None].to(tl.int64) * stride_h + d[None, :]
        m = (h < H)[:, None] & dmask[None, :]
        x1 = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(X + offs + HALF, mask=m, other=0.0).to(tl.float32)
        tl.store(X + offs, cast_rtne(x1 * cos[None, :] - x2 * sin[None, :], X.dtype.element_ty), mask=m)
        tl.store(X + offs + HALF, cast_rtne(x2 * cos[None, :] + x1 * sin[None, :], X.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_kernel(Q, K, POS, INV_FREQ, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sp_b, sp_t, T, HQ, HK,
                     scaling, sign, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr,
                     BLOCK_HK: tl.constexpr, DO_Q: tl.constexpr, DO_K: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        b = tok // T
        t = tok % T
        pos = tl.load(POS + b * sp_b + t * sp_t).to(tl.float32)
        d = tl.arange(0, BLOCK_D)
        dmask = d < HALF
        angle = pos * tl.load(INV_FREQ + d, mask=dmask, other=0.0)
        cos = tl.cos(angle) * scaling
        sin = tl.sin(angle) * (scaling * sign)
        if DO_Q:
            _rotate_heads(Q, b * sq_b + t * sq_t, sq_h, HQ, cos, sin, d, dmask, HALF, BLOCK_HQ)
        if DO_K:
            _rotate_heads(K, b * sk_b + t * sk_t, sk_h, HK, cos, sin, d, dmask, HALF, BLOCK_HK)


def default_inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``1 / theta^(2i/D)`` in float32, computed as transformers' default rope init does."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / head_dim
    return 1.0 / (theta ** exponent)


def _frequencies(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, theta: float | None,
                 inv_freq: torch.Tensor | None) -> torch.Tensor:
    if q.dim() not in (3, 4) or k.dim() != q.dim():
        raise InputError(f"apply_rope: q and k must both be (T, H, D) or (B, T, H, D), got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    D = q.shape[-1]
    if D % 2 or k.shape[-1] != D or k.shape[:-2] != q.shape[:-2]:
        raise InputError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} need the same leading dims and "
                         "the same even head dim")
    T = q.shape[-3]
    B = q.shape[0] if q.dim() == 4 else 1
    if position_ids.shape[-1] != T or position_ids.dim() > 2 or (
            position_ids.dim() == 2 and position_ids.shape[0] not in (1, B)):
        raise InputError(f"apply_rope: position_ids must be ({T},) or ({B}, {T}), got {tuple(position_ids.shape)}")
    if inv_freq is None:
        if theta is None:
            raise InputError("apply_rope: pass theta (rope base) or inv_freq (the model's rotary frequencies)")
        inv_freq = default_inv_freq(D, theta, q.device)
    if inv_freq.shape != (D // 2,):
        raise InputError(f"apply_rope: inv_freq must be ({D // 2},) for head dim {D}, got {tuple(inv_freq.shape)}")
    return inv_freq.to(device=q.device, dtype=torch.float32).contiguous()


def _launch(q: torch.Tensor | None, k: torch.Tensor | None, position_ids: torch.Tensor, inv_freq: torch.Tensor,
            scaling: float, sign: float) -> None:
    """Rotate ``q`` and ``k`` (either may be None) in place by ``sign * angle``."""
    ref = q if q is not None else k
    if ref.numel() == 0:
        return
    B, T = (ref.shape[0], ref.shape[1]) if ref.dim() == 4 else (1, ref.shape[0])
    D = ref.shape[-1]

    def strides(x):
        if x is None:
            return 0, 0, 0, 1
        if x.stride(-1) != 1:
            raise InputError("apply_rope: the head dim of q/k must be contiguous (unit stride)")
        s = x.stride()
        return (s[0] if x.dim() == 4 else 0), s[-3], s[-2], x.shape[-2]

    sq_b, sq_t, sq_h, hq = strides(q)
    sk_b, sk_t, sk_h, hk = strides(k)
    if position_ids.dim() == 1:
        sp_b, sp_t = 0, position_ids.stride(0)
    else:
        sp_b = position_ids.stride(0) if position_ids.shape[0] == B else 0
        sp_t = position_ids.stride(1)
    _rope_kernel[(B * T,)](q if q is not None else k, k if k is not None else q, position_ids, inv_freq,
                           sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sp_b, sp_t, T, hq, hk, scaling, sign,
                           HALF=D // 2, BLOCK_D=pow2(D // 2), BLOCK_HQ=pow2(hq), BLOCK_HK=pow2(hk),
                           DO_Q=q is not None, DO_K=k is not None, num_warps=4)


def _writable_in_place(t: torch.Tensor) -> bool:
    """Autograd lets a two-output Function modify an input in place only when it is neither a view nor a leaf
    that requires grad."""
    return t._base is None and not (t.is_leaf and t.requires_grad)


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_in, k_in, position_ids, inv_freq, scaling):
        q = q_in if _writable_in_place(q_in) else q_in.clone()
        k = k_in if _writable_in_place(k_in) else k_in.clone()
        _launch(q, k, position_ids, inv_freq, scaling, 1.0)
        ctx.mark_dirty(*(t for t, t_in in ((q, q_in), (k, k_in)) if t is t_in))
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.scaling = scaling
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        position_ids, inv_freq = ctx.saved_tensors
        dq = None if dq is None else dq.clone()
        dk = None if dk is None else dk.clone()
        if dq is not None or dk is not None:
            _launch(dq, dk, position_ids, inv_freq, ctx.scaling, -1.0)
        return dq, dk, None, None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, theta: float | None = None,
                         *, inv_freq: torch.Tensor | None = None,
                         attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch RoPE (new tensors, float32 arithmetic, rounded once); same conventions as :func:`apply_rope`."""
    inv = _frequencies(q, k, position_ids, theta, inv_freq)
    pos = position_ids.to(torch.float32)
    angle = pos[..., None] * inv                       # (T, D/2) or (B', T, D/2)
    emb = torch.cat((angle, angle), dim=-1)[..., None, :]  # broadcast over heads
    cos, sin = emb.cos() * attention_scaling, emb.sin() * attention_scaling
    if q.dim() == 4 and position_ids.dim() == 1:
        cos, sin = cos[None], sin[None]

    def rot(x):
        xf = x.float()
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)

    return rot(q), rot(k)


def apply_rope(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, theta: float | None = None, *,
               inv_freq: torch.Tensor | None = None,
               attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` by their tokens' positions; one launch, in place on the Triton path (returns the
    same tensors, so a caller must not need the unrotated values), new tensors on the reference path.
    Differentiable on both. When gradients are recorded, a ``q``/``k`` that is a view (e.g. a slice of a fused
    QKV output) or a leaf requiring grad is rotated into a new tensor instead, still in the same launch: autograd
    forbids a two-output Function from modifying those in place."""
    inv = _frequencies(q, k, position_ids, theta, inv_freq)
    if not use_triton(q, k, position_ids):
        return apply_rope_reference(q, k, position_ids, inv_freq=inv, attention_scaling=attention_scaling)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _RoPE.apply(q, k, position_ids, inv, float(attention_scaling))
    _launch(q, k, position_ids, inv, float(attention_scaling), 1.0)
    return q, k
