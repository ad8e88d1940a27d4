"""Q5_K: super-blocks of 256 weights in 8 sub-blocks of 32 (176 bytes, 5.5 bpw).

Layout: ``d: f16, dmin: f16, scales[12], qh[32], qs[128]``; scales/mins and low nibbles exactly as Q4_K, the 5th
bit of element ``64c + l`` is bit ``2c`` of ``qh[l]`` and of element ``64c + 32 + l`` bit ``2c + 1``;
``y = d*sc_j*q - dmin*m_j`` with ``q`` in 0..31.

Quantization follows ``quantize_row_q5_K_ref`` without an imatrix and ``quantize_row_q5_K_impl`` with one
(GGUF.md §2.2), vectorized over all super-blocks (:mod:`._kq_common`, :mod:`._search`).
"""

from __future__ import annotations

import torch

from ..formats import get_format
from ._kq_common import (
    byte_blocks,
    fp16_bytes,
    launch_dequant,
    load_f16,
    load_u8,
    q45_encode,
    q45_scales,
    quantize_rows,
    scale_min_k4,
    store_tile,
)
from ._triton import HAVE_TRITON, tl, triton

FMT = get_format("q5_k")
QK = FMT.block_size
NMAX = 31
REF_SEARCH = (-0.5, 0.1, 15)
"""``make_qkx2_quants`` (rmin, rdelta, nstep) of the no-imatrix path."""


def _encode(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    d, dmin, scales, L = q45_encode(x, qw, NMAX, REF_SEARCH)
    q = L.reshape(-1, 8, 32)
    hi = q >> 4
    bits = torch.arange(8, dtype=torch.int32, device=x.device).view(1, 8, 1)
    qh = (hi << bits).sum(dim=1, dtype=torch.int32)
    lo = (q & 15).reshape(-1, 4, 2, 32)
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, QK // 2)
    return torch.cat([fp16_bytes(d), fp16_bytes(dmin), scales, qh, qs], dim=1).to(torch.uint8)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/256*176)`` uint8, as ggml ``quantize_q5_K`` (ref path without imatrix)."""
    return quantize_rows(weight, imatrix, FMT, _encode)


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = byte_blocks(data, FMT)
    dl, ml = q45_scales(b)
    dev = b.device
    lo = (b[:, 48:].reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.int32, device=dev).view(1, 1, 2, 1)) & 15
    hi = (b[:, 16:48].reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.int32, device=dev).view(1, 8, 1)) & 1
    q = (lo.reshape(-1, 8, 32) | (hi << 4)).to(torch.float32)
    return (dl * q - ml).reshape(data.shape[0], -1).to(dtype)


if HAVE_TRITON:

    @triton.jit
    def dequant_q5_k_blocks(src, blk, mask, QK: tl.constexpr):
        """Dequantize the Q5_K super-blocks ``blk`` (1-D indices) to a float32 tile ``[len(blk), QK]``.

        A fused matmul calls this tile by tile; ``src`` points at the packed bytes. Compile without FMA
        contraction (``enable_fp_fusion=False``) to match :func:`dequantize` bit for bit.
        """
        base = blk.to(tl.int64) * 176
        e = tl.arange(0, QK)
        j = (e // 32)[None, :]
        ln = (e % 32)[None, :]
        m2 = mask[:, None]
        d = load_f16(src, base, mask)[:, None]
        dmin = load_f16(src, base + 2, mask)[:, None]
        sc, m = scale_min_k4(src, base[:, None] + 4, j, m2)
        qh = load_u8(src, base[:, None] + 16 + ln, m2)
        qb = load_u8(src, base[:, None] + 48 + (j // 2) * 32 + ln, m2)
        q = ((qb >> ((j % 2) * 4)) & 15) | (((qh >> j) & 1) << 4)
        return (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * m.to(tl.float32)

    @triton.jit
    def dequant_q5_k_kernel(src, dst, n_blocks, BLOCKS: tl.constexpr, QK: tl.constexpr):
        blk = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        mask = blk < n_blocks
        store_tile(dst, blk, mask, dequant_q5_k_blocks(src, blk, mask, QK), QK)


def dequantize_triton(
    data: torch.Tensor, dtype: torch.dtype = torch.float32, blocks_per_program: int = 16
) -> torch.Tensor:
    """Triton dequantize, same result as :func:`dequantize`."""
    return launch_dequant(dequant_q5_k_kernel, data, FMT, dtype, blocks_per_program)
