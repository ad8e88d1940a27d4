"""The attention input projections (Q, K, V) over quantized base weights with LoRA adapters, as one autograd
Function, optionally followed by RoPE on Q and K:

    q = proj_q(x), k = proj_k(x), v = proj_v(x),   proj(x) = x W^T + s (x A^T) B^T (+ bias)   (W a QuantWeight)
    q, k = rope(q, k, position_ids)                 (when position ids are given; heads of ``head_dim``)

K and V may have fewer rows than Q (grouped-query attention); each projection may hold its own format, rank and
scale. The forward saves ``x``, the adapters, the three ``x A^T`` (``(M, r)`` each, a few columns) and the
position ids: no projection output outlives the forward. RoPE runs in place on the fresh projection outputs
(:func:`~.rope.apply_rope`, one launch for Q and K), so it costs neither a copy nor a saved tensor. With
``dq, dk, dv`` the output gradients, the backward is::

    dq, dk <- rope^T(dq, dk)      (the rotation by -angle: one launch over copies of dq and dk)
    g_i = dy_i B_i                dx = sum_i dy_i W_i + [s_q g_q, s_k g_k, s_v g_v] [A_q; A_k; A_v]
    [dA_q; dA_k; dA_v] = [s_q g_q, s_k g_k, s_v g_v]^T x          dB_i = s_i dy_i^T (x A_i^T)

The three adapters' input- and A-gradients are each one GEMM over the concatenated ranks, so ``x`` is read once
for all adapter gradients. With few tokens on CUDA (and always under the CPU interpreter), where
:func:`~.lora_linear.use_fused` picks the fused kernels, each projection's forward and its ``dy W + s (dy B) A``
are one fused pass that dequantizes the base tiles in registers; otherwise each base weight is dequantized into a
transient buffer, multiplied by cuBLAS and freed before the next (never a persistent 16-bit copy). Gradients reach
``x``, the adapters and the biases, never the base weights. LoRA dropout (a separate LoRA input per projection) is
not supported here: with dropout, call :func:`~.lora_linear.lora_linear` per projection with its ``lora_x``.

The output projection needs no block of its own: :func:`~.lora_linear.lora_linear` already saves only its input
(and ``x A^T``) and has the fused backward, so ``lora_linear(attn, o.weight, o.lora_a, o.lora_b, o.scale)`` is it.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..errors import InputError
from ._launch import use_triton
from .lora_linear import fused_backward_dx, fused_forward, lora_linear_reference, use_fused
from .mlp import LoraProjection, _dequantize
from .rope import apply_rope, apply_rope_reference, default_inv_freq


def _check(x: torch.Tensor, projs: tuple[LoraProjection, ...], head_dim: int | None,
           position_ids: torch.Tensor | None) -> None:
    hidden = x.shape[-1]
    q, k, v = projs
    if any(p.weight.shape[1] != hidden for p in projs) or k.weight.shape[0] != v.weight.shape[0]:
        raise InputError(f"lora_qkv: expected q (n_q, {hidden}) and k, v (n_kv, {hidden}) weights for x (..., "
                         f"{hidden}); got q {q.weight.shape}, k {k.weight.shape}, v {v.weight.shape}")
    for name, p in zip("qkv", projs, strict=True):
        out_f, in_f = p.weight.shape
        if (p.lora_a is None) != (p.lora_b is None):
            raise InputError(f"lora_qkv: {name}'s lora_a and lora_b go together: pass both or neither")
        if p.lora_a is not None and (p.lora_a.dim() != 2 or p.lora_a.shape[1] != in_f
                                     or p.lora_b.shape != (out_f, p.lora_a.shape[0])):
            raise InputError(f"lora_qkv: expected {name}'s lora_a (r, {in_f}) and lora_b ({out_f}, r), got "
                             f"{tuple(p.lora_a.shape)} and {tuple(p.lora_b.shape)}")
        if p.bias is not None and p.bias.shape != (out_f,):
            raise InputError(f"lora_qkv: {name}'s bias must be ({out_f},), got {tuple(p.bias.shape)}")
    if position_ids is not None:
        if head_dim is None or head_dim <= 0 or q.weight.shape[0] % head_dim or k.weight.shape[0] % head_dim:
            raise InputError(f"lora_qkv: RoPE needs a head_dim dividing the q and k widths "
                             f"({q.weight.shape[0]}, {k.weight.shape[0]}), got {head_dim}")


def _heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(..., H * D)`` -> ``(..., H, D)`` view."""
    return t.view(*t.shape[:-1], t.shape[-1] // head_dim, head_dim)


class _LoraQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qa, qb, ka, kb, va, vb, q_bias, k_bias, v_bias, position_ids, inv_freq, projs, rope):
        lead, hidden = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, hidden).contiguous()
        adapters = ((qa, qb), (ka, kb), (va, vb))
        biases = (q_bias, k_bias, v_bias)
        fused = use_fused(x2, projs[0].weight)
        ys, xas = [], []
        if fused:
            for p, (a, b), bias in zip(projs, adapters, biases, strict=True):
                y, xa = fused_forward(x2, None, p.weight, a, b, bias, p.scale)
                ys.append(y)
                xas.append(xa)
        else:
            live = [a.to(x.dtype) for a, _ in adapters if a is not None]
            xa_cat = x2 @ torch.cat(live).t() if live else x2[:, :0]            # (M, sum r): one pass over x
            xa_live = iter(torch.split(xa_cat, [a.shape[0] for a in live], dim=1))
            for p, (a, b), bias in zip(projs, adapters, biases, strict=True):
                xa = None if a is None else next(xa_live)
                w = _dequantize(p.weight, x.dtype)
                y = x2 @ w.t() if xa is None else torch.mm(xa, b.to(x.dtype).t()).addmm_(x2, w.t(), beta=p.scale)
                del w
                if bias is not None:
                    y.add_(bias.to(x.dtype))
                ys.append(y)
                xas.append(xa)
        q, k, v = (y.view(*lead, -1) for y in ys)
        if rope is not None:
            head_dim, scaling = rope
            q_rot, k_rot = apply_rope(_heads(q, head_dim), _heads(k, head_dim), position_ids, inv_freq=inv_freq,
                                      attention_scaling=scaling)
            q, k = q_rot.reshape(q.shape), k_rot.reshape(k.shape)
        ctx.projs, ctx.rope, ctx.fused = projs, rope, fused
        ctx.bias_dtypes = tuple(None if t is None else t.dtype for t in biases)
        ctx.save_for_backward(x, qa, qb, ka, kb, va, vb, *xas, position_ids, inv_freq)
        return q, k, v

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv):
        x, qa, qb, ka, kb, va, vb, xa_q, xa_k, xa_v, position_ids, inv_freq = ctx.saved_tensors
        need = ctx.needs_input_grad
        hidden = x.shape[-1]
        x2 = x.reshape(-1, hidden)
        adapters = ((qa, qb), (ka, kb), (va, vb))

        def flat(d, p, rotated):
            d = d.reshape(-1, p.weight.shape[0])
            # the gradients of rotated outputs are rotated back in place: on copies, never on autograd's buffers
            return d.to(x.dtype, memory_format=torch.contiguous_format, copy=rotated).contiguous()

        rotated = (ctx.rope is not None,) * 2 + (False,)
        dys = [flat(d, p, r) for d, p, r in zip((dq, dk, dv), ctx.projs, rotated, strict=True)]
        if ctx.rope is not None:
            # rope(a)^T = rope(-a): rotate back by the negated positions (pos * inv_freq negates exactly in float32)
            head_dim, scaling = ctx.rope
            dq_h, dk_h = (_heads(d.view(*x.shape[:-1], -1), head_dim) for d in dys[:2])
            dq_un, dk_un = apply_rope(dq_h, dk_h, -position_ids, inv_freq=inv_freq, attention_scaling=scaling)
            dys[0], dys[1] = dq_un.reshape(dys[0].shape), dk_un.reshape(dys[1].shape)

        dx = None
        gs = []
        for p, (a, b), dy in zip(ctx.projs, adapters, dys, strict=True):
            if ctx.fused and need[0]:
                dx_i, g = fused_backward_dx(dy, p.weight, a, b, p.scale, a is not None)
                dx = dx_i if dx is None else dx.add_(dx_i)
                del dx_i
            else:
                g = None if a is None else dy @ b.to(x.dtype)
                if need[0] and not ctx.fused:
                    w = _dequantize(p.weight, x.dtype)
                    dx = dy @ w if dx is None else dx.addmm_(dy, w)
                    del w
            gs.append(None if g is None else g * p.scale)

        live = [i for i, (a, _) in enumerate(adapters) if a is not None]
        grads_a: list[torch.Tensor | None] = [None, None, None]
        grads_b: list[torch.Tensor | None] = [None, None, None]
        if live:
            g_cat = torch.cat([gs[i] for i in live], dim=1)                    # (M, sum r), scaled by s_i
            if need[0] and not ctx.fused:
                dx.addmm_(g_cat, torch.cat([adapters[i][0].to(x.dtype) for i in live]))
            if any(need[1 + 2 * i] for i in live):
                da_cat = g_cat.t() @ x2                                         # (sum r, hidden)
                for i, da in zip(live, torch.split(da_cat, [adapters[i][0].shape[0] for i in live]), strict=True):
                    grads_a[i] = da.to(adapters[i][0].dtype) if need[1 + 2 * i] else None
            for i in live:
                if need[2 + 2 * i]:
                    xa = (xa_q, xa_k, xa_v)[i]
                    grads_b[i] = (dys[i].t() @ xa).mul_(ctx.projs[i].scale).to(adapters[i][1].dtype)
        grads_bias = [dy.sum(0).to(dtype) if need[7 + i] else None
                      for i, (dy, dtype) in enumerate(zip(dys, ctx.bias_dtypes, strict=True))]
        dx = dx.reshape(x.shape) if need[0] else None
        return (dx, grads_a[0], grads_b[0], grads_a[1], grads_b[1], grads_a[2], grads_b[2], *grads_bias,
                None, None, None, None)


def _frequencies(head_dim: int, device: torch.device, theta: float | None,
                 inv_freq: torch.Tensor | None) -> torch.Tensor:
    """The float32 ``(head_dim / 2,)`` rotary frequencies: given, or derived from ``theta``."""
    if inv_freq is None:
        if theta is None:
            raise InputError("lora_qkv: pass theta (rope base) or inv_freq (the model's rotary frequencies)")
        inv_freq = default_inv_freq(head_dim, theta, device)
    if inv_freq.shape != (head_dim // 2,):
        raise InputError(f"lora_qkv: inv_freq must be ({head_dim // 2},) for head dim {head_dim}, got "
                         f"{tuple(inv_freq.shape)}")
    return inv_freq.to(device=device, dtype=torch.float32).contiguous()


def lora_qkv_reference(x: torch.Tensor, q: LoraProjection, k: LoraProjection, v: LoraProjection, *,
                       head_dim: int | None = None, position_ids: torch.Tensor | None = None,
                       theta: float | None = None, inv_freq: torch.Tensor | None = None,
                       attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition through :func:`lora_linear_reference` and :func:`apply_rope_reference`; autograd gives the
    gradients. Same arguments and results as :func:`lora_qkv`."""
    projs = (q, k, v)
    _check(x, projs, head_dim, position_ids)
    ys = [lora_linear_reference(x, p.weight, p.lora_a, p.lora_b, p.scale, p.bias) for p in projs]
    if position_ids is not None:
        inv = _frequencies(head_dim, x.device, theta, inv_freq)
        q_rot, k_rot = apply_rope_reference(_heads(ys[0], head_dim), _heads(ys[1], head_dim), position_ids,
                                            inv_freq=inv, attention_scaling=attention_scaling)
        ys[0], ys[1] = q_rot.reshape(ys[0].shape), k_rot.reshape(ys[1].shape)
    return ys[0], ys[1], ys[2]


def lora_qkv(x: torch.Tensor, q: LoraProjection, k: LoraProjection, v: LoraProjection, *,
             head_dim: int | None = None, position_ids: torch.Tensor | None = None, theta: float | None = None,
             inv_freq: torch.Tensor | None = None,
             attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Q, K, V projections of ``x (..., hidden)`` with a hand-written backward that saves only ``x``, the
    adapters and their ``x A^T``. Returns ``q (..., n_q)``, ``k (..., n_kv)``, ``v (..., n_kv)`` (contiguous;
    view them as ``(..., heads, head_dim)``). With ``position_ids`` (``(T,)`` or ``(B, T)``, per token, restarting
    at 0 per packed example), q and k are rotated (RoPE, Hugging Face rotate_half convention) over heads of
    ``head_dim`` with frequencies ``inv_freq`` or those of base ``theta``, times ``attention_scaling``.
    Grads to ``x``, every adapter and bias that requires grad; never to the base weights."""
    projs = (q, k, v)
    _check(x, projs, head_dim, position_ids)
    inv = None if position_ids is None else _frequencies(head_dim, x.device, theta, inv_freq)
    if not use_triton(x):
        return lora_qkv_reference(x, q, k, v, head_dim=head_dim, position_ids=position_ids, inv_freq=inv,
                                  attention_scaling=attention_scaling)
    for p in projs:
        if p.weight.device != x.device:
            raise InputError(f"lora_qkv: a weight is on {p.weight.device}, x on {x.device}; move it with .to()")
    bases = tuple(LoraProjection(p.weight, None, None, float(p.scale)) for p in projs)
    rope = None if position_ids is None else (head_dim, float(attention_scaling))
    return _LoraQKV.apply(x, q.lora_a, q.lora_b, k.lora_a, k.lora_b, v.lora_a, v.lora_b, q.bias, k.bias, v.bias,
                          position_ids, inv, bases, rope)
