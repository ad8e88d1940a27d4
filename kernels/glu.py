"""Gated linear units: ``swiglu(g, u) = silu(g) * u`` (Llama, Qwen, Mistral) and ``geglu(g, u) = gelu_tanh(g) * u``
(Gemma), forward and hand-written backward, float32 arithmetic rounded once to the input dtype.

Derivatives, with ``s = sigmoid(g)`` and, for GeGLU, ``t = tanh(c (g + 0.044715 g^3))``, ``c = sqrt(2 / pi)``::

    silu(g)  = g s                      silu'(g)  = s (1 + g (1 - s))
    gelu(g)  = g (1 + t) / 2            gelu'(g)  = (1 + t) / 2 + g (1 - t^2) c (1 + 3 * 0.044715 g^2) / 2

The autograd Functions save ``g`` and ``u`` only. :func:`glu_backward` is also what the MLP block calls in its
own backward: one pass gives ``h`` (recomputed, needed for the down projection's LoRA gradients), ``dg`` and
``du``, optionally written over the (recomputed, owned) ``dh``, ``g`` and ``u`` buffers.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ._launch import use_triton
from ._triton import HAVE_TRITON, tl, triton

ACTIVATIONS = ("swiglu", "geglu")
_BLOCK = 1024

if HAVE_TRITON:
    from ._launch import cast_rtne, tanh_f32

    @triton.jit
    def _act_and_grad(g, GELU: tl.constexpr):
        """(act(g), act'(g)) in float32."""
        if GELU:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            t = tanh_f32(inner)
            act = 0.5 * g * (1.0 + t)
            d = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        else:
            s = tl.sigmoid(g)
            act = g * s
            d = s * (1.0 + g * (1.0 - s))
        return act, d

    @triton.jit
    def _glu_fwd_kernel(G, U, H, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        act, _ = _act_and_grad(g, GELU)
        tl.store(H + offs, cast_rtne(act * u, H.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd_kernel(DH, G, U, H_OUT, DG, DU, n, GELU: tl.constexpr, WRITE_H: tl.constexpr,
                        BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        act, d = _act_and_grad(g, GELU)
        if WRITE_H:
            tl.store(H_OUT + offs, cast_rtne(act * u, H_OUT.dtype.element_ty), mask=mask)
        tl.store(DG + offs, cast_rtne(dh * u * d, DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, cast_rtne(dh * act, DU.dtype.element_ty), mask=mask)


def _check(gate: torch.Tensor, up: torch.Tensor, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise InputError(f"unknown GLU activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise InputError(f"gate and up must match in shape and dtype, got {tuple(gate.shape)} {gate.dtype} and "
                         f"{tuple(up.shape)} {up.dtype}")


def _grid(n: int) -> tuple[int]:
    return (max(1, -(-n // _BLOCK)),)


def glu_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` through the Triton kernel (no autograd)."""
    gate, up = gate.contiguous(), up.contiguous()
    h = torch.empty_like(gate)
    if h.numel():
        _glu_fwd_kernel[_grid(h.numel())](gate, up, h, h.numel(), GELU=activation == "geglu", BLOCK=_BLOCK)
    return h


def glu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str, *,
                 want_h: bool = False, overwrite: bool = False):
    """``(h or None, dgate, dup)`` in one pass. ``overwrite=True`` writes ``h``, ``dgate``, ``dup`` over ``dh``,
    ``gate``, ``up`` (which must then be contiguous buffers the caller owns and no longer needs)."""
    dh, gate, up = dh.contiguous(), gate.contiguous(), up.contiguous()
    if overwrite:
        h, dg, du = dh, gate, up
    else:
        h = torch.empty_like(gate) if want_h else None
        dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _glu_bwd_kernel[_grid(n)](dh, gate, up, h if want_h else dg, dg, du, n, GELU=activation == "geglu",
                                  WRITE_H=want_h, BLOCK=_BLOCK)
    return (h if want_h else None), dg, du


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """PyTorch ``act(gate) * up`` in float32, rounded once to the input dtype (autograd gives the gradients)."""
    _check(gate, up, activation)
    g = gate.float()
    act = torch.nn.functional.silu(g) if activation == "swiglu" else torch.nn.functional.gelu(g, approximate="tanh")
    return (act * up.float()).to(gate.dtype)


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, activation):
        ctx.activation = activation
        ctx.save_for_backward(gate, up)
        return glu_forward(gate, up, activation)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        _, dg, du = glu_backward(dh, gate, up, ctx.activation)
        return dg, du, None


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` for ``activation`` in ``ACTIVATIONS``; differentiable."""
    _check(gate, up, activation)
    if not use_triton(gate, up):
        return glu_reference(gate, up, activation)
    return _GLU.apply(gate, up, activation)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; differentiable."""
    return glu(gate, up, "swiglu")


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` (Gemma's MLP); differentiable."""
    return glu(gate, up, "geglu")


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return glu_reference(gate, up, "geglu")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return glu_reference(gate, up, "swiglu")
