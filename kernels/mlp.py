"""The gated MLP block over quantized base weights with LoRA adapters, as one autograd Function:

    y = down(act(gate(x)) * up(x)),   proj(x) = x W^T + s (x A^T) B^T   (W a frozen QuantWeight)

``act`` is SiLU (SwiGLU: Llama, Qwen, Mistral) or tanh-GELU (GeGLU: Gemma). The forward runs the three
projections through :func:`~.lora_linear.lora_linear` and the GLU kernel, and saves only ``x`` and the
adapters: no ``gate``, ``up`` or ``h`` activation outlives the forward. The backward recomputes ``gate`` and
``up`` from ``x`` (or, with ``save_gate_up=True``, reads them saved by the forward: two LoRA linears fewer for
two ``(M, inter)`` activations kept), then, with ``dy`` the output gradient::

    dh = dy W_d + s_d (dy B_d) A_d          dB_d = s_d dy^T (h A_d^T)     dA_d = s_d (dy B_d)^T h
    h, dg, du = glu_backward(dh, gate, up)  (one pass, written over dh and recomputed gate, up)
    dx = dg W_g + du W_u + s_g (dg B_g) A_g + s_u (du B_u) A_u,  dA_*/dB_* as for the down projection

Each base product ``dY W`` dequantizes one weight into a transient buffer that is freed before the next
(never a persistent 16-bit copy). Gradients reach ``x`` and the adapters, never the base weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..formats import Family
from . import tiles
from ._launch import use_triton
from .glu import ACTIVATIONS, glu_backward, glu_forward, glu_reference
from .lora_linear import lora_linear, lora_linear_reference
from .qweight import QuantWeight, compute_copy


@dataclass
class LoraProjection:
    """One projection: frozen base ``weight`` (out, in), optional adapters ``lora_a`` (r, in), ``lora_b`` (out, r),
    optional ``bias`` (out,) (attention projections of Qwen2 and the like; the MLP block takes none)."""

    weight: QuantWeight
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scale: float = 1.0
    bias: torch.Tensor | None = None


def _check(x: torch.Tensor, gate: LoraProjection, up: LoraProjection, down: LoraProjection, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise InputError(f"lora_mlp: unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    inter, hidden = gate.weight.shape
    if up.weight.shape != (inter, hidden) or down.weight.shape != (hidden, inter) or x.shape[-1] != hidden:
        raise InputError(f"lora_mlp: expected gate/up ({inter}, {hidden}), down ({hidden}, {inter}) and x (..., "
                         f"{hidden}); got up {up.weight.shape}, down {down.weight.shape}, x {tuple(x.shape)}")
    if any(p.bias is not None for p in (gate, up, down)):
        raise InputError("lora_mlp: the MLP projections take no bias")


def _dequantize(weight: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """Transient ``(out, in)`` copy of a base weight: the Triton tile dequantizer on CUDA, the codec elsewhere."""
    if weight.device.type == "cuda" and weight.format.family is not Family.FLOAT:
        return tiles.dequantize(weight.format, weight.data, dtype, aux=weight.extra.get("aux"),
                                double_quant=weight.double_quant)
    return compute_copy(weight, dtype)


def _input_grad(dy: torch.Tensor, proj: LoraProjection, need_input: bool, out: torch.Tensor | None = None):
    """``dy W + s (dy B) A`` (accumulated into ``out`` when given; None unless ``need_input``) and ``dy B``
    (None without adapters)."""
    dyb = None if proj.lora_a is None else dy @ proj.lora_b.to(dy.dtype)
    if not need_input:
        return out, dyb
    w = _dequantize(proj.weight, dy.dtype)
    if out is None:
        out = dy @ w
    else:
        out.addmm_(dy, w)
    del w
    if dyb is not None:
        out.addmm_(dyb, proj.lora_a.to(dy.dtype), alpha=proj.scale)
    return out, dyb


def _adapter_grads(dy: torch.Tensor, dyb: torch.Tensor | None, inp: torch.Tensor, proj: LoraProjection,
                   need_a: bool, need_b: bool):
    """``dA = s (dy B)^T inp`` and ``dB = s dy^T (inp A^T)`` in the adapters' dtypes."""
    if dyb is None:
        return None, None
    da = (dyb.t() @ inp).mul_(proj.scale).to(proj.lora_a.dtype) if need_a else None
    db = None
    if need_b:
        db = (dy.t() @ (inp @ proj.lora_a.to(inp.dtype).t())).mul_(proj.scale).to(proj.lora_b.dtype)
    return da, db


class _LoraMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ga, gb, ua, ub, da, db, projs, activation, save_gate_up):
        gate, up, down = projs
        g = lora_linear(x, gate.weight, ga, gb, gate.scale)
        u = lora_linear(x, up.weight, ua, ub, up.scale)
        h = glu_forward(g, u, activation)
        if not save_gate_up:
            g = u = None
        y = lora_linear(h, down.weight, da, db, down.scale)
        ctx.projs = projs  # base weights and scales; the adapters go through save_for_backward
        ctx.activation = activation
        ctx.save_for_backward(x, ga, gb, ua, ub, da, db, g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, ga, gb, ua, ub, da, db, g, u = ctx.saved_tensors
        gate, up, down = (LoraProjection(p.weight, a, b, p.scale)
                          for p, a, b in zip(ctx.projs, (ga, ua, da), (gb, ub, db), strict=True))
        need = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        recompute = g is None
        if recompute:
            g = lora_linear(x2, gate.weight, ga, gb, gate.scale)
            u = lora_linear(x2, up.weight, ua, ub, up.scale)
        dh, dyb = _input_grad(dy2, down, True)
        # recomputed gate/up are ours to overwrite; saved ones are left intact (a retained graph reads them again)
        h, dg, du = glu_backward(dh, g.reshape(dh.shape[0], -1), u.reshape(dh.shape[0], -1), ctx.activation,
                                 want_h=True, overwrite=recompute)
        del dh, g, u
        d_da, d_db = _adapter_grads(dy2, dyb, h, down, need[5], need[6])
        del h, dyb
        dx, dgb = _input_grad(dg, gate, need[0])
        d_ga, d_gb = _adapter_grads(dg, dgb, x2, gate, need[1], need[2])
        del dgb
        dx, dub = _input_grad(du, up, need[0], out=dx)
        d_ua, d_ub = _adapter_grads(du, dub, x2, up, need[3], need[4])
        return (dx.reshape(x.shape) if need[0] else None), d_ga, d_gb, d_ua, d_ub, d_da, d_db, None, None, None


def lora_mlp_reference(x: torch.Tensor, gate: LoraProjection, up: LoraProjection, down: LoraProjection,
                       activation: str = "swiglu") -> torch.Tensor:
    """The definition through :func:`lora_linear_reference` and :func:`glu_reference`; autograd gives the grads."""
    _check(x, gate, up, down, activation)
    g = lora_linear_reference(x, gate.weight, gate.lora_a, gate.lora_b, gate.scale)
    u = lora_linear_reference(x, up.weight, up.lora_a, up.lora_b, up.scale)
    h = glu_reference(g, u, activation)
    return lora_linear_reference(h, down.weight, down.lora_a, down.lora_b, down.scale)


def lora_mlp(x: torch.Tensor, gate: LoraProjection, up: LoraProjection, down: LoraProjection,
             activation: str = "swiglu", *, save_gate_up: bool = False) -> torch.Tensor:
    """The MLP block ``down(act(gate(x)) * up(x))`` with a hand-written backward that saves only ``x``.
    ``x (..., hidden)``; gate/up weights ``(inter, hidden)``, down ``(hidden, inter)``; activation 'swiglu' or
    'geglu'. Grads to ``x`` and every adapter that requires grad. ``save_gate_up=True`` also keeps the gate and
    up outputs (two ``(..., inter)`` tensors) for the backward instead of recomputing them: two fewer LoRA
    linears per backward for that much more activation memory."""
    _check(x, gate, up, down, activation)
    if not use_triton(x):
        return lora_mlp_reference(x, gate, up, down, activation)
    projs = tuple(LoraProjection(p.weight, None, None, p.scale) for p in (gate, up, down))
    return _LoraMLP.apply(x, gate.lora_a, gate.lora_b, up.lora_a, up.lora_b, down.lora_a, down.lora_b, projs,
                          activation, bool(save_gate_up))
