"""Q3_K: super-blocks of 256 weights in 16 sub-blocks of 16 (110 bytes, 3.4375 bpw).

Layout: ``hmask[32], qs[64], scales[12], d: f16`` (``d`` last). Sixteen signed 6-bit scales stored ``+32``:
the low nibble of scale ``j`` is in ``scales[j % 8]`` (low nibble for ``j < 8``, high nibble otherwise), its top
two bits are bits ``2*(j/4)`` of ``scales[8 + j%4]``. The low 2 bits of the codes are packed as in Q2_K, the high
bit of element ``e`` is bit ``e/32`` of ``hmask[e%32]``; ``q = low2 - (hbit ? 0 : 4)`` in -4..3 and
``y = d * (scale_j - 32) * q``.

Quantization follows ``quantize_row_q3_K_ref`` without an imatrix (``make_q3_quants``, scales by the
largest-magnitude one) and ``quantize_row_q3_K_impl`` with one (weights ``qw * sqrt(σ² + x²)``,
``make_qx_quants`` for the codes and for the scales) (GGUF.md §2.2), vectorized over all super-blocks.
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
    quantize_rows,
    requant_sym,
    to_groups,
    unpack_crumbs,
)
from ._search import max_abs_signed, q3_search_t, qx_search_t, seqsum, sqrt_f32

FMT = get_format("q3_k")
QK = FMT.block_size


def _pack_scales(ls: torch.Tensor) -> torch.Tensor:
    """Sixteen 6-bit scales ``(S, 16)`` (already ``+32``) -> the 12 packed bytes."""
    lo = ls & 15
    hi = (ls >> 4).reshape(-1, 4, 4)
    high = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return torch.cat([lo[:, :8] | (lo[:, 8:] << 4), high], dim=1)


def _unpack_scales(b: torch.Tensor) -> torch.Tensor:
    """12 packed bytes ``(S, 12)`` -> signed scales ``(S, 16)`` in -32..31."""
    lo = torch.cat([b[:, :8] & 15, b[:, :8] >> 4], dim=1)
    sh = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=b.device).view(1, 4, 1)
    hi = ((b[:, 8:12].reshape(-1, 1, 4) >> sh) & 3).reshape(-1, 16)
    return (lo | (hi << 4)) - 32


def _encode(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    S = x.shape[0]
    xs = to_groups(x, 16)
    if qw is None:
        scale, L = q3_search_t(xs, 4)
        sc = scale.view(S, 16)
        max_scale = max_abs_signed(sc, dim=1)
        nz = max_scale != 0
        iscale = cdiv(-32.0, torch.where(nz, max_scale, torch.ones_like(max_scale)))
        ls = (sc * iscale[:, None]).round_().clamp_(-32, 31).to(torch.int32).add_(32)
        ls = ls.masked_fill_(~nz[:, None], 0)
        d = fp16_round(cdiv(1.0, iscale)).masked_fill_(~nz, 0.0)
    else:
        sigma2 = divc(block_sum_sq(x).mul_(2.0), 256.0)
        w = to_groups(sqrt_f32(torch.mul(x, x).add_(sigma2[:, None])).mul_(qw), 16)
        swt = seqsum(w).view(S, 16).t().contiguous()
        scale, L = qx_search_t(xs, 4, w)
        d_block, ls = qx_search_t(scale.view(S, 16).t().contiguous(), 32, swt)
        ls = ls.t()
        d = fp16_round(d_block)
    packed = _pack_scales(ls)
    dj = (d[:, None] * _unpack_scales(packed).to(torch.float32)).reshape(-1)
    L = from_groups(requant_sym(xs, L, dj, -4, 3), QK)
    hbit = L >> 2
    hmask = (hbit.reshape(-1, 8, 32) << torch.arange(8, dtype=torch.int32, device=x.device).view(1, 8, 1)).sum(
        dim=1, dtype=torch.int32
    )
    return torch.cat([hmask, pack_crumbs(L & 3), packed, fp16_bytes(d)], dim=1).to(torch.uint8)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/256*110)`` uint8, as ggml ``quantize_q3_K`` (ref path without imatrix)."""
    return quantize_rows(weight, imatrix, FMT, _encode)


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = byte_blocks(data, FMT)
    d = fp16_from(b[:, 108:110])
    dl = (d[:, None] * _unpack_scales(b[:, 96:108]).to(torch.float32)).unsqueeze(-1)
    low = unpack_crumbs(b[:, 32:96])
    hbit = (b[:, :32].reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.int32, device=b.device).view(1, 8, 1)) & 1
    q = low - ((hbit.reshape(-1, QK) ^ 1) << 2)
    return (dl * q.reshape(-1, 16, 16).to(torch.float32)).reshape(data.shape[0], -1).to(dtype)


dequantize_triton = functools.partial(tiles.dequantize, FMT)
"""Triton dequantize through the registry tile (:mod:`.tiles`), same values as :func:`dequantize`."""
