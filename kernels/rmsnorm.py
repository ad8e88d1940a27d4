"""RMSNorm with a hand-written backward: ``y = x / sqrt(mean(x^2) + eps) * (offset + w)``.

``offset=0`` is Llama's norm, ``offset=1`` Gemma's (its checkpoints store ``w`` around 0 and scale by ``1 + w``).
Statistics and arithmetic are float32 whatever the input dtype; ``y`` is rounded once to ``x.dtype``.
The forward saves ``x``, ``w`` and one float32 ``rstd`` per row; the backward gives ``dx`` and, when the weight
requires grad, ``dw`` (per-program partial sums in float32, reduced at the end).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ._launch import pow2, use_triton, warps_for
from ._triton import HAVE_TRITON, tl, triton

if HAVE_TRITON:
    from ._launch import cast_rtne

    @triton.jit
    def _rms_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, N, eps, offset, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
        tl.store(Y + row * stride_y + cols, cast_rtne(x * rstd * w, Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_bwd_kernel(DY, X, W, RSTD, DX, DW, stride_dy, stride_x, stride_dx, M, N, offset, rows_per_prog,
                        BLOCK: tl.constexpr, HAS_DW: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        start = pid * rows_per_prog
        stop = tl.minimum(start + rows_per_prog, M)
        for r in range(start, stop):
            row = tl.cast(r, tl.int64)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            wdy = w * dy
            c = tl.sum(xhat * wdy, axis=0) / N
            tl.store(DX + row * stride_dx + cols, cast_rtne((wdy - xhat * c) * rstd, DX.dtype.element_ty), mask=mask)
            if HAS_DW:
                dw += dy * xhat
        if HAS_DW:
            tl.store(DW + pid.to(tl.int64) * N + cols, dw, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(..., N)`` -> ``(M, N)`` with unit column stride (a copy only when the last dim is strided)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise InputError(f"rms_norm: weight must be ({x.shape[-1]},) to match x's last dim, got "
                         f"{tuple(weight.shape)}; pass the norm's 1-D weight")


def _forward(x2: torch.Tensor, weight: torch.Tensor, eps: float, offset: float):
    M, N = x2.shape
    y = torch.empty(x2.shape, device=x2.device, dtype=x2.dtype)
    rstd = torch.empty(M, device=x2.device, dtype=torch.float32)
    block = pow2(N)
    if M:
        _rms_fwd_kernel[(M,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), N, eps, offset,
                              BLOCK=block, num_warps=warps_for(block))
    return y, rstd


def _backward(dy2, x2, weight, rstd, offset: float, need_dw: bool):
    M, N = x2.shape
    dx = torch.empty(x2.shape, device=x2.device, dtype=x2.dtype)
    block = pow2(N)
    if x2.is_cuda:
        n_prog = min(M, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count)
    else:
        n_prog = min(M, 4)
    n_prog = max(n_prog, 1)
    rows_per = -(-M // n_prog) if M else 1
    n_prog = -(-M // rows_per) if M else 1
    dw_part = torch.zeros((n_prog, N), device=x2.device, dtype=torch.float32) if need_dw else dx
    if M:
        _rms_bwd_kernel[(n_prog,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0), dx.stride(0),
                                   M, N, offset, rows_per, BLOCK=block, HAS_DW=need_dw,
                                   num_warps=warps_for(block))
    dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        x2 = _rows(x)
        y, rstd = _forward(x2, weight, eps, offset)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = offset
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        dx, dw = _backward(dy2, x2, weight, rstd, ctx.offset, ctx.needs_input_grad[1])
        return dx.view(dy.shape), dw, None, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """PyTorch RMSNorm in float32, rounded once to ``x.dtype`` (autograd gives its gradients)."""
    _check(x, weight)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.float())
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape); ``offset=1.0`` for Gemma. Grads to x and weight."""
    _check(x, weight)
    if not use_triton(x, weight):
        return rms_norm_reference(x, weight, eps, offset)
    return _RMSNorm.apply(x, weight, float(eps), float(offset))
