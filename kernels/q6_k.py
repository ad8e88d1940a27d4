"""Q6_K: super-blocks of 256 weights in 16 sub-blocks of 16 (210 bytes, 6.5625 bpw).

Layout: ``ql[128], qh[64], scales: int8[16], d: f16`` (``d`` last). Codes are 6-bit, stored ``+32``; half ``h``
(128 elements) uses ``ql[64h:64h+64]`` and ``qh[32h:32h+32]``: for ``l < 32`` element ``l`` is
``ql[l] & 15 | (qh[l] & 3) << 4``, ``l+32`` is ``ql[l+32] & 15 | (qh[l] >> 2 & 3) << 4``, ``l+64`` is
``ql[l] >> 4 | (qh[l] >> 4 & 3) << 4`` and ``l+96`` is ``ql[l+32] >> 4 | (qh[l] >> 6) << 4``.
``y = d * scales[e/16] * (q - 32)``.

Quantization follows ``quantize_row_q6_K_ref`` (weights ``x²``) and ``quantize_row_q6_K_impl`` (raw imatrix
weights, no σ² term) (GGUF.md §2.2), vectorized over all super-blocks.
"""

from __future__ import annotations

import functools

import torch

from ..formats import get_format
from . import tiles
from ._kq_common import (
    byte_blocks,
    cdiv,
    fp16_bytes,
    fp16_from,
    fp16_round,
    from_groups,
    quantize_rows,
    requant_sym,
    to_groups,
)
from ._search import GROUP_MAX_EPS, max_abs_signed, qx_search_t

FMT = get_format("q6_k")
QK = FMT.block_size


def _encode(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    S = x.shape[0]
    xs = to_groups(x, 16)
    scale, L = qx_search_t(xs, 32, None if qw is None else to_groups(qw, 16))
    sc = scale.view(S, 16)
    max_scale = max_abs_signed(sc, dim=1)
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = cdiv(-128.0, torch.where(zero, torch.ones_like(max_scale), max_scale))
    d = fp16_round(cdiv(1.0, iscale)).masked_fill_(zero, 0.0)
    ls = (sc * iscale[:, None]).round_().clamp_(max=127).to(torch.int32)
    dj = (d[:, None] * ls.to(torch.float32)).reshape(-1)
    L = from_groups(requant_sym(xs, L, dj, -32, 31), QK)
    L = L.masked_fill_(zero[:, None], 0)
    ls = ls.masked_fill_(zero[:, None], 0)
    q = L.reshape(-1, 2, 4, 32)
    lo, hi = q & 15, q >> 4
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2).reshape(-1, QK // 2)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, QK // 4)
    return torch.cat([ql, qh, ls & 255, fp16_bytes(d)], dim=1).to(torch.uint8)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/256*210)`` uint8, as ggml ``quantize_q6_K`` (ref path without imatrix)."""
    return quantize_rows(weight, imatrix, FMT, _encode)


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = byte_blocks(data, FMT)
    dev = b.device
    d = fp16_from(b[:, 208:210])
    sc = b[:, 192:208].to(torch.uint8).view(torch.int8).to(torch.float32)
    dl = (d[:, None] * sc).unsqueeze(-1)
    sh_l = torch.tensor([0, 4], dtype=torch.int32, device=dev).view(1, 1, 2, 1)
    sh_h = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=dev).view(1, 1, 4, 1)
    ql = (b[:, :128].reshape(-1, 2, 1, 64) >> sh_l) & 15
    qh = (b[:, 128:192].reshape(-1, 2, 1, 32) >> sh_h) & 3
    q = (ql.reshape(-1, 2, 4, 32) | (qh << 4)) - 32
    return (dl * q.reshape(-1, 16, 16).to(torch.float32)).reshape(data.shape[0], -1).to(dtype)


dequantize_triton = functools.partial(tiles.dequantize, FMT)
"""Triton dequantize through the registry tile (:mod:`.tiles`), same values as :func:`dequantize`."""
