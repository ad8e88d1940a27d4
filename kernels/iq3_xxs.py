"""IQ3_XXS: super-blocks of 256 weights, ``d: f16, qs: u8[96]`` (98 bytes, 3.0625 bpw).

``qs[0:64]``: one byte per group of 4 weights, an index into the 256-point IQ3 lattice of :mod:`._iq_grids`.
``qs[64:96]``: one little-endian u32 per 32-weight block, the 7 stored sign bits of each group of 8 weights (bits
``7l``..``7l+6``, the 8th sign implied by parity) and a 4-bit scale ``s`` in bits 28..31:
``y = d * (0.5 + s) * 0.5 * grid * sign``.

``quantize`` is llama.cpp's ``quantize_row_iq3_xxs_impl`` (grid size 256): weights ``qw * sqrt(2Σx²/256 + x²)``
with an imatrix, ``x²`` without; signs folded per group of 8; the trial search of
:func:`._iq_common.trial_search` over 31 grids ``(15 + 0.2 k) / max`` per 32-weight block; then
``d = max_scale / 31``, stored as ``fp16(d * 1.0125)`` (ggml's fudge factor), ``s = nearest(0.5 * (scale / d - 1))``.
"""

from __future__ import annotations

import torch

from ..formats import get_format
from . import _iq_common
from ._blocks import as_byte_blocks, bytes_to_f16
from ._iq_common import (
    block_scale_codes,
    fold_signs,
    importance,
    lattice_indices,
    le_bytes,
    quantize_lattice,
    sign_bits,
    trial_search,
)
from ._iq_grids import dequant_grid, search_tables
from ._legacy_common import fdiv, put_f16
from ._search import f32, sqrt_f32
from ._triton import HAVE_TRITON, tl, triton

FMT = get_format("iq3_xxs")
QK = FMT.block_size
LATTICE = "iq3_256"
KMAX = 8
EPS = 1e-8


def _encode(x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor) -> None:
    """Float32 rows ``(rows, n)`` -> packed super-blocks ``out`` ``(rows * n / 256, 98)``."""
    t = search_tables(LATTICE, 2, KMAX - 1, x.device)
    xb = x.reshape(-1, QK)
    nbl = xb.shape[0]
    qwb = None if qw is None else qw.reshape(1, -1, QK).expand(x.shape[0], -1, -1).reshape(-1, QK)
    w = importance(xb, qwb, 2.0).reshape(-1, 32)
    xval, signs = fold_signs(xb.reshape(-1, 32), w)
    mx = xval.amax(dim=1)
    live = ~(mx < f32(EPS))
    scale, q = trial_search(t, xval, w, sqrt_f32(w), live, mx, 2 * KMAX - 1, 0.2, 15, KMAX)
    neg = scale < 0
    scale = torch.where(neg, -scale, scale)
    signs = torch.where(neg[:, None], (~signs) & 127, signs)
    idx = torch.where(live[:, None], lattice_indices(t, q), 0).reshape(nbl, 64)
    sign_word = torch.where(live[:, None], signs << (7 * torch.arange(4, device=x.device)), 0).sum(dim=1)
    scale = torch.where(live, scale, 0.0).reshape(nbl, 8)
    max_scale = scale.amax(dim=1).clamp(min=0.0)
    d = fdiv(max_scale, 31.0)
    words = sign_word.reshape(nbl, 8) | (block_scale_codes(scale, d) << 28)
    keep = (max_scale > 0)[:, None]
    put_f16(out, 0, d * f32(1.0125))
    out[:, 2:66] = torch.where(keep, idx, 0).to(torch.uint8)
    out[:, 66:98] = le_bytes(torch.where(keep, words, 0), 4)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/256*98)`` uint8; ``imatrix`` ``(n,)`` weights the search."""
    tables = search_tables(LATTICE, 2, KMAX - 1)
    return quantize_lattice(weight, imatrix, "iq3_xxs", FMT.type_size, tables, _encode)


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = as_byte_blocks(data, FMT.type_size)
    nb = b.shape[0]
    d = bytes_to_f16(b[:, :2])
    idx = b[:, 2:66].to(torch.int64).reshape(nb, 8, 8)
    word = (b[:, 66:98].to(torch.int64).reshape(nb, 8, 4) << (8 * torch.arange(4, device=data.device))).sum(dim=2)
    db = (d * ((word >> 28).to(torch.float32) + 0.5)) * 0.5
    grid = dequant_grid(LATTICE, data.device)[idx].reshape(nb, 8, 4, 8)
    neg = sign_bits((word[:, :, None] >> (7 * torch.arange(4, device=data.device))) & 127)
    y = db[:, :, None, None] * grid
    y = torch.where(neg, -y, y)
    return y.to(dtype).reshape(data.shape[0], -1)


tile_aux, dequantize_triton = _iq_common.codec_entry_points(FMT, LATTICE)


if HAVE_TRITON:
    from ._iq_common import signed, u32_at

    @triton.jit
    def iq3_xxs_tile(src, aux, row, col, stride, mask):
        """IQ3_XXS tile (signature of :mod:`.tiles`); ``aux`` = :func:`tile_aux`."""
        base = row.to(tl.int64) * stride + (col // 256).to(tl.int64) * 98
        e = (col % 256).to(tl.int32)
        j = e % 32
        idx = tl.load(src + base + 2 + e // 4, mask=mask, other=0).to(tl.int32)
        word = u32_at(src, base + 66 + 4 * (e // 32), mask)
        lo = tl.load(src + base, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(src + base + 1, mask=mask, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        db = (d * ((word >> 28).to(tl.float32) + 0.5)) * 0.5
        g = tl.load(aux + idx * 4 + e % 4, mask=mask, other=0.0)
        return signed(db * g, ((word >> (7 * (j // 8))) & 127).to(tl.int32), j % 8)
