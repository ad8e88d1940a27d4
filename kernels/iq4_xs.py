"""IQ4_XS: super-blocks of 256 weights, ``d: f16, scales_h: u16, scales_l[4], qs[128]`` (136 bytes, 4.25 bpw).

Eight 32-weight blocks, each with a 6-bit scale ``ls`` (low 4 bits in ``scales_l[ib/2]``, nibble ``ib % 2``; high
2 bits at bits ``2ib`` of ``scales_h``): ``y = d * (ls - 32) * KVALUES_IQ4NL[q]``, codes as IQ4_NL per block.
``quantize`` is llama.cpp's ``quantize_iq4_xs`` (``quantize_row_iq4_nl_impl`` with ``ntry = 7`` over 256-weight
super-blocks): block scales from :func:`._iq4_common.block_scales`, ``d = -max_scale / 32``,
``ls = clamp(nearest(scale / d), -32, 31) + 32``, codes from the unrounded float32 ``d * (ls - 32)``.
"""

from __future__ import annotations

import functools

import torch

from ..formats import get_format
from . import tiles
from ._blocks import as_byte_blocks, bytes_to_f16
from ._iq4_common import best_index, block_scales, grid_values, importance
from ._legacy_common import (
    fdiv,
    position_major,
    put_f16,
    put_nibbles,
    quantize_rows,
    signed_absmax,
    unpack_nibbles,
)
from ._search import cdiv

FMT = get_format("iq4_xs")
QK = FMT.block_size
NSUB = QK // 32


def _encode(x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor) -> None:
    """Float32 rows ``(rows, n)`` -> packed super-blocks ``out`` ``(rows * n / 256, 136)``."""
    xt = position_major(x)
    # A NaN block scale (all-zero importances) is skipped by ggml's max search and rounds to l = 0, as 0 does.
    scales = block_scales(xt, importance(x, xt, qw, QK)).nan_to_num_(nan=0.0).reshape(-1, NSUB)
    # ggml's running max starts at +0.0: an all-zero super-block gets d = -0.0.
    d = fdiv(-(signed_absmax(scales, 1) + 0.0), 32.0)
    inv = torch.where(d != 0, cdiv(1.0, d), 0.0)
    ls = (inv[:, None] * scales).round_().clamp_(-32, 31)
    dl = d[:, None] * ls
    idl = torch.where(dl != 0, cdiv(1.0, dl), 0.0)
    codes = best_index(xt * idl.reshape(1, -1))
    ls = (ls + 32).to(torch.int32)
    shifts = 2 * torch.arange(NSUB, device=x.device, dtype=torch.int32)
    scales_h = ((ls >> 4) << shifts).sum(dim=1, dtype=torch.int32)
    lo = ls & 15
    put_f16(out, 0, d)
    out[:, 2] = scales_h & 255
    out[:, 3] = scales_h >> 8
    out[:, 4:8] = lo[:, 0::2] | (lo[:, 1::2] << 4)
    put_nibbles(out[:, 8:].unflatten(1, (NSUB, 16)), 0, codes.t().reshape(-1, NSUB, 32))


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/256*136)`` uint8; ``imatrix`` ``(n,)`` weights the scale search."""
    return quantize_rows(weight, imatrix, QK, FMT.type_size, _encode, fast="iq4_xs")


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = as_byte_blocks(data, FMT.type_size)
    d = bytes_to_f16(b[:, :2])
    sh = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)
    ib = torch.arange(NSUB, device=data.device, dtype=torch.int32)
    lo = (b[:, 4 + ib // 2].to(torch.int32) >> (4 * (ib % 2))) & 15
    ls = lo | (((sh[:, None] >> (2 * ib)) & 3) << 4)
    dl = d * (ls - 32).to(torch.float32)
    q = grid_values(unpack_nibbles(b[:, 8:].reshape(-1, 16))).reshape(-1, NSUB, 32)
    y = dl[:, :, None] * q
    return y.to(dtype).reshape(data.shape[0], -1)


dequantize_triton = functools.partial(tiles.dequantize, FMT)
"""Triton dequantize through the registry tile (:mod:`.tiles`), same values as :func:`dequantize`."""
