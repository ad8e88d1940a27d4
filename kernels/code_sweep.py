"""One pass of single-step code moves over a batch of columns: the inner loop of the tuned rounding mode.

For weights with scales ``s``, codes ``c`` and the gradient ``G = (Ŵ - W) H`` of the output error
``Σ_rows Δ H Δᵀ``, the columns ``j`` of a batch are taken in order: moving a code one step up changes the row's
error by ``s² H_jj + 2 s G_j`` and one step down by ``s² H_jj - 2 s G_j``; the code takes the step that lowers the
error most (up on a tie; none where neither lowers it, the code is at the end of its range or the block is dead)
and the batch's columns of ``G`` move by ``δ H[j, batch]`` for the value step ``δ = k s``. Rows are independent,
columns are not.

The PyTorch reference runs the columns as a small loop of whole-row tensor ops (about 30 kernel launches per
column on a GPU: a 14336-column matrix costs ~430,000 launches a pass), the Triton kernel (CUDA tensors) keeps a
``BLOCK_R`` x batch tile of ``G`` in registers and walks the columns inside one launch. Both compute the same
float32 operations in the same order (a product and a separate addition for the update), so they give the same
codes, steps and gradient bit for bit.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ._launch import pow2, use_triton
from ._triton import HAVE_TRITON, tl, triton

TILE = 4096
"""Gradient values per program's register tile (``BLOCK_R`` rows x the batch's columns, rounded up to a power of
two)."""

if HAVE_TRITON:

    @triton.jit
    def _sweep_kernel(G, S, LIVE, CODES, H, D, R, n, b0, nb, top, BP: tl.constexpr, BLOCK_R: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rl = rows < R
        cs = tl.arange(0, BP)
        cm = cs < nb
        at = rows.to(tl.int64)[:, None] * n + b0 + cs[None, :]
        m2 = rl[:, None] & cm[None, :]
        tile = tl.load(G + at, mask=m2, other=0.0)
        for j in range(nb):
            g = tl.sum(tl.where(cs[None, :] == j, tile, -0.0), axis=1)
            col = rows.to(tl.int64) * n + b0 + j
            s = tl.load(S + col, mask=rl, other=0.0)
            live = tl.load(LIVE + col, mask=rl, other=0) != 0
            code = tl.load(CODES + col, mask=rl, other=0)
            hrow = H + (b0 + j).to(tl.int64) * n + b0
            quad = (s * s) * tl.load(hrow + j)
            lin = (2.0 * s) * g
            d_up = tl.where(live & (code < top), quad + lin, 0.0)
            d_dn = tl.where(live & (code > 0), quad - lin, 0.0)
            k = tl.where((d_up < 0.0) & (d_up <= d_dn), 1, tl.where(d_dn < 0.0, -1, 0))
            tl.store(CODES + col, code + k, mask=rl)
            delta = k.to(tl.float32) * s
            tl.store(D + rows.to(tl.int64) * nb + j, delta, mask=rl)
            h = tl.load(hrow + cs, mask=cm, other=0.0)
            tile = tile + delta[:, None] * h[None, :]
        tl.store(G + at, tile, mask=m2)


def _check(g: torch.Tensor, s: torch.Tensor, live: torch.Tensor, codes: torch.Tensor, h: torch.Tensor, b0: int,
           b1: int) -> None:
    R, n = g.shape
    if s.shape != (R, n) or live.shape != (R, n) or codes.shape != (R, n) or h.shape != (n, n):
        raise InputError(f"code sweep: gradient {tuple(g.shape)}, scales {tuple(s.shape)}, live {tuple(live.shape)}, "
                         f"codes {tuple(codes.shape)} and H {tuple(h.shape)} do not fit")
    if not 0 <= b0 < b1 <= n:
        raise InputError(f"code sweep: columns {b0}:{b1} outside 0:{n}")
    if g.dtype != torch.float32 or s.dtype != torch.float32 or h.dtype != torch.float32 or codes.dtype != torch.int64:
        raise InputError("code sweep: the gradient, scales and H must be float32 and the codes int64")


def sweep_codes_reference(g: torch.Tensor, s: torch.Tensor, live: torch.Tensor, codes: torch.Tensor,
                          h: torch.Tensor, b0: int, b1: int, top: int) -> torch.Tensor:
    """PyTorch reference of :func:`sweep_codes` (any device)."""
    _check(g, s, live, codes, h, b0, b1)
    R = g.shape[0]
    d = torch.zeros((R, b1 - b0), dtype=torch.float32, device=g.device)
    for j in range(b0, b1):
        sj, gj, hjj = s[:, j], g[:, j], h[j, j]
        quad = sj * sj * hjj
        d_up = torch.where(live[:, j] & (codes[:, j] < top), quad + 2 * sj * gj, 0.0)
        d_dn = torch.where(live[:, j] & (codes[:, j] > 0), quad - 2 * sj * gj, 0.0)
        k = torch.where((d_up < 0) & (d_up <= d_dn), 1, torch.where(d_dn < 0, -1, 0))
        codes[:, j] += k
        delta = k.to(torch.float32) * sj
        d[:, j - b0] = delta
        g[:, b0:b1] += delta[:, None] * h[j, b0:b1][None, :]
    return d


def sweep_codes(g: torch.Tensor, s: torch.Tensor, live: torch.Tensor, codes: torch.Tensor, h: torch.Tensor,
                b0: int, b1: int, top: int) -> torch.Tensor:
    """Sweep columns ``b0:b1`` of rows ``(R, n)``: gradient ``g`` and ``codes`` (int64, indices ``0 .. top``) are
    updated in place (``g`` inside the batch only), ``s`` holds each weight's scale, ``live`` where its block has
    one, ``h`` is ``H`` ``(n, n)``. Returns the value steps ``(R, b1 - b0)``, which the caller applies to ``g``'s
    other columns. CUDA tensors go to the Triton kernel (:func:`sweep_codes_triton`), others to the reference;
    both give the same results."""
    if g.is_cuda and HAVE_TRITON:
        return sweep_codes_triton(g, s, live, codes, h, b0, b1, top)
    return sweep_codes_reference(g, s, live, codes, h, b0, b1, top)


def sweep_codes_triton(g: torch.Tensor, s: torch.Tensor, live: torch.Tensor, codes: torch.Tensor, h: torch.Tensor,
                       b0: int, b1: int, top: int) -> torch.Tensor:
    """:func:`sweep_codes` as one Triton launch (CUDA, or CPU under ``TRITON_INTERPRET=1``); every tensor
    contiguous."""
    _check(g, s, live, codes, h, b0, b1)
    if not use_triton(g, s, live, codes, h):
        raise InputError("the code sweep kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if not all(t.is_contiguous() for t in (g, s, live, codes, h)):
        raise InputError("the code sweep kernel takes contiguous tensors")
    R, n = g.shape
    nb = b1 - b0
    d = torch.empty((R, nb), dtype=torch.float32, device=g.device)
    bp = pow2(nb)
    block_r = max(1, min(pow2(R), TILE // bp))
    if R:
        _sweep_kernel[(triton.cdiv(R, block_r),)](g, s, live.view(torch.uint8), codes, h, d, R, n, b0, nb, top, BP=bp,
                                                  BLOCK_R=block_r, num_warps=4, enable_fp_fusion=False)
    return d
