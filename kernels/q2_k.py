"""Q2_K: super-blocks of 256 weights in 16 sub-blocks of 16 (84 bytes, 2.625 bpw).

Layout: ``scales[16], qs[64], d: f16, dmin: f16`` (``d`` last). ``scales[j]`` holds the 4-bit scale of
sub-block ``j`` in its low nibble and the 4-bit min in its high nibble; 2-bit codes, element
``128h + 32c + l`` is ``qs[32h + l] >> 2c & 3``. ``y = d*(sc & 15)*q - dmin*(sc >> 4)``.

Quantization follows ``quantize_row_q2_K_ref`` without an imatrix (``make_qkx2`` with weights ``|x|`` and
absolute error, 4-bit scales from the max) and ``quantize_row_q2_K_impl`` with one (weights
``qw * sqrt(σ² + x²)`` with ``σ² = mean x²``, ``make_qkx3``, ``make_qp_quants`` for the scales) (GGUF.md §2.2).
"""

from __future__ import annotations

import functools

import torch

from ..formats import get_format
from . import tiles
from ._kq_common import (
    block_sum_sq,
    byte_blocks,
    cdiv,
    divc,
    fp16_bytes,
    fp16_from,
    fp16_round,
    from_groups,
    pack_crumbs,
    positive_or_zero,
    quantize_rows,
    requant_asym,
    to_groups,
    unpack_crumbs,
)
from ._search import qkx_search_t, qp_search_t, seqsum, sqrt_f32

FMT = get_format("q2_k")
QK = FMT.block_size
NMAX = 3


def _four_bit(v: torch.Tensor, vmax: torch.Tensor) -> torch.Tensor:
    """``nearest(15 / vmax * v)`` per super-block (``(S, 16)`` int32), 0 where ``vmax`` is not positive."""
    inv = cdiv(15.0, torch.where(vmax > 0, vmax, torch.ones_like(vmax)))
    q = (v * inv[:, None]).round_().to(torch.int32)
    return q.masked_fill_((vmax <= 0)[:, None], 0)


def _encode(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    S = x.shape[0]
    xs = to_groups(x, 16)
    if qw is None:
        scale, the_min, L = qkx_search_t(xs, xs.abs(), NMAX, -0.5, 0.1, 15, True, strict_flat=True)
        sc, mn = scale.view(S, 16), the_min.view(S, 16)
        max_scale = positive_or_zero(sc.amax(dim=1))
        max_min = positive_or_zero(mn.amax(dim=1))
        byte = (_four_bit(sc, max_scale) | (_four_bit(mn, max_min) << 4)) & 255
        d = fp16_round(divc(max_scale, 15.0))
        dmin = fp16_round(divc(max_min, 15.0))
    else:
        sigma2 = divc(block_sum_sq(x), 256.0)
        w = to_groups(sqrt_f32(torch.mul(x, x).add_(sigma2[:, None])).mul_(qw), 16)
        swt = seqsum(w).view(S, 16).t().contiguous()
        scale, the_min, L = qkx_search_t(xs, w, NMAX, -0.9, 0.05, 36, False, strict_flat=False)
        d_block, ls = qp_search_t(scale.view(S, 16).t().contiguous(), 15, swt)
        m_block, lm = qp_search_t(the_min.view(S, 16).t().contiguous(), 15, swt)
        byte = (ls.t() | (lm.t() << 4)) & 255
        d, dmin = fp16_round(d_block), fp16_round(m_block)
    dj = (d[:, None] * (byte & 15).to(torch.float32)).reshape(-1)
    mj = (dmin[:, None] * (byte >> 4).to(torch.float32)).reshape(-1)
    L = from_groups(requant_asym(xs, L, dj, mj, NMAX), QK)
    return torch.cat([byte, pack_crumbs(L), fp16_bytes(d), fp16_bytes(dmin)], dim=1).to(torch.uint8)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/256*84)`` uint8, as ggml ``quantize_q2_K`` (ref path without imatrix)."""
    return quantize_rows(weight, imatrix, FMT, _encode)


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = byte_blocks(data, FMT)
    sc = b[:, :16]
    d = fp16_from(b[:, 80:82])
    dmin = fp16_from(b[:, 82:84])
    dl = (d[:, None] * (sc & 15).to(torch.float32)).unsqueeze(-1)
    ml = (dmin[:, None] * (sc >> 4).to(torch.float32)).unsqueeze(-1)
    q = unpack_crumbs(b[:, 16:80]).reshape(-1, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(data.shape[0], -1).to(dtype)


dequantize_triton = functools.partial(tiles.dequantize, FMT)
"""Triton dequantize through the registry tile (:mod:`.tiles`), same values as :func:`dequantize`."""
