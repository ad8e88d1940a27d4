"""Q4_K: super-blocks of 256 weights in 8 sub-blocks of 32 (144 bytes, 4.5 bpw).

Layout: ``d: f16, dmin: f16, scales[12], qs[128]``; sub-block ``j`` has a 6-bit scale ``sc_j`` and min ``m_j``
(packed as in GGUF.md §1), codes are 4-bit, ``y = d*sc_j*q - dmin*m_j``. ``qs[32c + l]`` holds element
``64c + l`` in its low nibble and ``64c + 32 + l`` in its high nibble.

Quantization follows ``quantize_row_q4_K_ref`` without an imatrix and ``quantize_row_q4_K_impl`` with one
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

FMT = get_format("q4_k")
QK = FMT.block_size
NMAX = 15
REF_SEARCH = (-1.0, 0.1, 20)
"""``make_qkx2_quants`` (rmin, rdelta, nstep) of the no-imatrix path."""


def _encode(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    d, dmin, scales, L = q45_encode(x, qw, NMAX, REF_SEARCH)
    q = L.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, QK // 2)
    return torch.cat([fp16_bytes(d), fp16_bytes(dmin), scales, qs], dim=1).to(torch.uint8)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/256*144)`` uint8, as ggml ``quantize_q4_K`` (ref path without imatrix)."""
    return quantize_rows(weight, imatrix, FMT, _encode)


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = byte_blocks(data, FMT)
    dl, ml = q45_scales(b)
    shifts = torch.tensor([0, 4], dtype=torch.int32, device=b.device).view(1, 1, 2, 1)
    q = ((b[:, 16:].reshape(-1, 4, 1, 32) >> shifts) & 15).reshape(-1, 8, 32).to(torch.float32)
    return (dl * q - ml).reshape(data.shape[0], -1).to(dtype)


if HAVE_TRITON:

    @triton.jit
    def dequant_q4_k_blocks(src, blk, mask, QK: tl.constexpr):
        """Dequantize the Q4_K super-blocks ``blk`` (1-D indices) to a float32 tile ``[len(blk), QK]``.

        A fused matmul calls this tile by tile; ``src`` points at the packed bytes. Compile without FMA
        contraction (``enable_fp_fusion=False``) to match :func:`dequantize` bit for bit.
        """
        base = blk.to(tl.int64) * 144
        e = tl.arange(0, QK)
        j = (e // 32)[None, :]
        m2 = mask[:, None]
        d = load_f16(src, base, mask)[:, None]
        dmin = load_f16(src, base + 2, mask)[:, None]
        sc, m = scale_min_k4(src, base[:, None] + 4, j, m2)
        qb = load_u8(src, base[:, None] + 16 + ((e // 64) * 32 + e % 32)[None, :], m2)
        q = (qb >> ((j % 2) * 4)) & 15
        return (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * m.to(tl.float32)

    @triton.jit
    def dequant_q4_k_kernel(src, dst, n_blocks, BLOCKS: tl.constexpr, QK: tl.constexpr):
        blk = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        mask = blk < n_blocks
        store_tile(dst, blk, mask, dequant_q4_k_blocks(src, blk, mask, QK), QK)


def dequantize_triton(
    data: torch.Tensor, dtype: torch.dtype = torch.float32, blocks_per_program: int = 16
) -> torch.Tensor:
    """Triton dequantize, same result as :func:`dequantize`."""
    return launch_dequant(dequant_q4_k_kernel, data, FMT, dtype, blocks_per_program)
