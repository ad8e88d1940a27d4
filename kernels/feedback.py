"""Error feedback through one block of columns: the inner loop of GPTQ-style rounding, for many rows at once.

For every row, the block's columns ``k = 0 .. B-1`` are taken in order: the current weight ``w`` goes to the
nearest value ``s * values[c] + o`` of the row's code grid (``s``, ``o``: the scale and offset the block's scales
give that weight), its error ``e = (w - y) / U[k, k]`` is recorded, and the block's later columns move by
``-U[k, k'] e``. Rows are independent, columns are not; the PyTorch reference runs the columns as one small
loop of whole-row tensor ops (about a dozen kernel launches per column on a GPU, which bounds the GPU's speed),
the Triton kernel (CUDA tensors) keeps a tile of ``B`` columns by ``BLOCK_R`` rows in registers and walks the columns inside
one launch.

Both compute the same float32 operations in the same order (IEEE divisions, a product and a separate subtraction
for the update, round-half-to-even), so they give the same codes and errors bit for bit. ``w`` holds, when they
return, each column's weight at the moment it was quantized (the target a later scale refit uses).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ._launch import pow2, use_triton
from ._triton import HAVE_TRITON, tl, triton

TILE = 4096
"""Weights per program's register tile (``B x BLOCK_R``): 16 rows of a 256-column block, 128 of a 32-column one."""

if HAVE_TRITON:

    @triton.jit
    def _round_half_even(t):
        f = tl.floor(t)
        frac = t - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        up = (frac > 0.5) | ((frac == 0.5) & odd)
        return tl.where(up, f + 1.0, f)

    @triton.jit
    def _feedback_kernel(W, S, O, U, V, CODES, ERR, R, B: tl.constexpr, BLOCK_R: tl.constexpr, NV: tl.constexpr,
                         UNIFORM: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = rows < R
        ks = tl.arange(0, B)
        at = ks.to(tl.int64)[:, None] * R + rows[None, :]
        tile = tl.load(W + at, mask=live[None, :], other=0.0)
        v0 = tl.load(V)
        for k in range(B):
            w = tl.sum(tl.where(ks[:, None] == k, tile, 0.0), axis=0)
            col = k * R + rows.to(tl.int64)
            s = tl.load(S + col, mask=live, other=0.0)
            o = tl.load(O + col, mask=live, other=0.0)
            nz = s != 0.0
            t = tl.where(nz, tl.math.div_rn(w - o, tl.where(nz, s, 1.0)), 0.0)
            if UNIFORM:
                q = tl.minimum(tl.maximum(_round_half_even(t) - v0, 0.0), NV - 1.0)
                code = q.to(tl.int32)
                val = q + v0
            else:
                code = tl.zeros((BLOCK_R,), dtype=tl.int32)
                for m in tl.static_range(NV - 1):
                    mid = (tl.load(V + m) + tl.load(V + m + 1)) * 0.5
                    code += (t > mid).to(tl.int32)
                val = tl.load(V + code)
            y = s * val + o
            e = tl.math.div_rn(w - y, tl.load(U + k * B + k) + tl.zeros_like(w))
            tl.store(CODES + col, code.to(tl.int64), mask=live)
            tl.store(ERR + col, e, mask=live)
            tl.store(W + col, w, mask=live)
            urow = tl.load(U + k * B + ks, mask=ks > k, other=0.0)
            tile = tile - urow[:, None] * e[None, :]


def _check(w: torch.Tensor, s: torch.Tensor, o: torch.Tensor, u: torch.Tensor, values: torch.Tensor) -> None:
    B = w.shape[0]
    if w.dim() != 2 or s.shape != w.shape or o.shape != w.shape or u.shape != (B, B) or values.dim() != 1:
        raise InputError(f"feedback block: weights {tuple(w.shape)}, scales {tuple(s.shape)}, offsets "
                         f"{tuple(o.shape)}, factor {tuple(u.shape)} and values {tuple(values.shape)} do not fit")
    if any(t.dtype != torch.float32 for t in (w, s, o, u, values)):
        raise InputError("feedback block: every input must be float32")


def nearest_code(t: torch.Tensor, values: torch.Tensor, uniform: bool) -> torch.Tensor:
    """Index (int64) of the grid value nearest to ``t``; ties go to the lower value on a non-uniform grid and to
    the even integer on a uniform one."""
    if uniform:
        return (t.round() - values[0]).clamp_(0, len(values) - 1).to(torch.int64)
    return torch.bucketize(t, (values[1:] + values[:-1]) * 0.5)


def feedback_block_reference(w: torch.Tensor, s: torch.Tensor, o: torch.Tensor, u: torch.Tensor,
                             values: torch.Tensor, uniform: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`feedback_block` (any device)."""
    _check(w, s, o, u, values)
    B = w.shape[0]
    safe = torch.where(s != 0, s, torch.ones_like(s))
    codes = torch.empty(w.shape, dtype=torch.int64, device=w.device)
    err = torch.empty_like(w)
    for k in range(B):
        idx = nearest_code(torch.where(s[k] != 0, (w[k] - o[k]) / safe[k], 0.0), values, uniform)
        codes[k] = idx
        e = (w[k] - (s[k] * values[idx] + o[k])) / u[k, k]
        err[k] = e
        if k + 1 < B:
            w[k + 1:].sub_(u[k, k + 1:, None] * e[None, :])
    return codes, err


def feedback_block(w: torch.Tensor, s: torch.Tensor, o: torch.Tensor, u: torch.Tensor, values: torch.Tensor,
                   uniform: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the ``B`` columns of ``w`` ``(B, rows)`` (float32, contiguous, updated in place) in order with
    error feedback through ``u`` ``(B, B)``, the block's part of the upper Cholesky factor of ``H⁻¹``; ``s``, ``o``
    ``(B, rows)`` give each weight's grid ``s * values + o``. Returns codes ``(B, rows)`` int64 and the scaled
    errors ``e`` ``(B, rows)``. CUDA tensors go to the Triton kernel (:func:`feedback_block_triton`), others to
    the reference; both give the same results."""
    if w.is_cuda and HAVE_TRITON and w.shape[0] == pow2(w.shape[0]) and w.is_contiguous():
        return feedback_block_triton(w, s, o, u, values, uniform)
    return feedback_block_reference(w, s, o, u, values, uniform)


def feedback_block_triton(w: torch.Tensor, s: torch.Tensor, o: torch.Tensor, u: torch.Tensor, values: torch.Tensor,
                          uniform: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`feedback_block` as one Triton launch (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``B`` must be a
    power of two and ``w`` contiguous."""
    _check(w, s, o, u, values)
    B, R = w.shape
    if not use_triton(w, s, o, u, values):
        raise InputError("the feedback kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if B != pow2(B) or not w.is_contiguous():
        raise InputError(f"the feedback kernel takes a contiguous block of a power-of-two column count, got {B}")
    s, o, u, values = s.contiguous(), o.contiguous(), u.contiguous(), values.contiguous()
    codes = torch.empty(w.shape, dtype=torch.int64, device=w.device)
    err = torch.empty_like(w)
    block_r = max(1, min(pow2(R), TILE // B))
    if R:
        _feedback_kernel[(triton.cdiv(R, block_r),)](w, s, o, u, values, codes, err, R, B=B, BLOCK_R=block_r,
                                                     NV=values.numel(), UNIFORM=uniform, num_warps=4,
                                                     enable_fp_fusion=False)
    return codes, err
