"""IQ2_XS: super-blocks of 256 weights, ``d: f16, qs: u16[32], scales: u8[8]`` (74 bytes, 2.3125 bpw).

Each group of 8 weights takes one ``qs`` entry: a 9-bit index into the 512-point IQ2 lattice of
:mod:`._iq_grids` and, in bits 9..15, its 7 stored sign bits (the 8th implied by parity). Each 16-weight block
``ib`` has a 4-bit scale ``s`` (nibble ``ib % 2`` of ``scales[ib / 2]``): ``y = d * (0.5 + s) * 0.25 * grid * sign``.

``quantize`` is llama.cpp's ``quantize_row_iq2_xs_impl``, which needs an importance matrix: weights
``qw * sqrt(Σx²/256 + x²)``, signs folded per group of 8, the trial search of
:func:`._iq_common.trial_search` over 19 grids ``(5 + 0.1 k) / max`` per 16-weight block, then
``d = max_scale / 31`` and ``s = nearest(0.5 * (scale / d - 1))``.
"""

from __future__ import annotations

import torch

from ..errors import ImatrixRequired
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
from ._search import sqrt_f32
from ._triton import HAVE_TRITON, tl, triton

FMT = get_format("iq2_xs")
QK = FMT.block_size
LATTICE = "iq2_512"
KMAX = 3
EPS = 1e-15


def _encode(x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor) -> None:
    """Float32 rows ``(rows, n)`` -> packed super-blocks ``out`` ``(rows * n / 256, 74)``."""
    t = search_tables(LATTICE, 2, KMAX - 1, x.device)
    xb = x.reshape(-1, QK)
    nbl = xb.shape[0]
    qwb = qw.reshape(1, -1, QK).expand(x.shape[0], -1, -1).reshape(-1, QK)
    w = importance(xb, qwb, 1.0).reshape(-1, 16)
    xval, signs = fold_signs(xb.reshape(-1, 16), w)
    mx = xval.amax(dim=1)
    live = ~(mx < EPS)
    scale, q = trial_search(t, xval, w, sqrt_f32(w), live, mx, 2 * KMAX - 1, 0.1, 9, KMAX)
    neg = scale < 0
    scale = torch.where(neg, -scale, scale)
    signs = torch.where(neg[:, None], (~signs) & 127, signs)
    entries = torch.where(live[:, None], lattice_indices(t, q) | (signs << 9), 0).reshape(nbl, 32)
    scale = torch.where(live, scale, 0.0).reshape(nbl, 16)
    max_scale = scale.amax(dim=1).clamp(min=0.0)
    d = fdiv(max_scale, 31.0)
    ls = block_scale_codes(scale, d)
    keep = (max_scale > 0)[:, None]
    put_f16(out, 0, d)
    out[:, 2:66] = le_bytes(torch.where(keep, entries, 0), 2)
    out[:, 66:74] = torch.where(keep, ls[:, 0::2] | (ls[:, 1::2] << 4), 0).to(torch.uint8)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/256*74)`` uint8. ``imatrix`` ``(n,)`` is required, as in llama.cpp."""
    if imatrix is None:
        raise ImatrixRequired(
            "iq2_xs needs an importance matrix (llama.cpp refuses to make it without one); "
            "compute one with `quantforge calibrate` and pass it with --imatrix"
        )
    tables = search_tables(LATTICE, 2, KMAX - 1)
    return quantize_lattice(weight, imatrix, "iq2_xs", FMT.type_size, tables, _encode)


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = as_byte_blocks(data, FMT.type_size)
    nb = b.shape[0]
    d = bytes_to_f16(b[:, :2])
    entries = b[:, 2:66].to(torch.int64).reshape(nb, 32, 2)
    entries = entries[:, :, 0] | (entries[:, :, 1] << 8)
    sc = b[:, 66:74].to(torch.int64)
    s = torch.stack([sc & 15, sc >> 4], dim=2).reshape(nb, 16)
    db = (d * (s.to(torch.float32) + 0.5)) * 0.25
    grid = dequant_grid(LATTICE, data.device)[entries & 511]
    y = db.repeat_interleave(2, dim=1)[:, :, None] * grid
    y = torch.where(sign_bits(entries >> 9), -y, y)
    return y.to(dtype).reshape(data.shape[0], -1)


tile_aux, dequantize_triton = _iq_common.codec_entry_points(FMT, LATTICE)


if HAVE_TRITON:
    from ._iq_common import signed

    @triton.jit
    def iq2_xs_tile(src, aux, row, col, stride, mask):
        """IQ2_XS tile (signature of :mod:`.tiles`); ``aux`` = :func:`tile_aux`."""
        base = row.to(tl.int64) * stride + (col // 256).to(tl.int64) * 74
        e = (col % 256).to(tl.int32)
        grp = e // 8
        entry = tl.load(src + base + 2 + 2 * grp, mask=mask, other=0).to(tl.int32) | (
            tl.load(src + base + 3 + 2 * grp, mask=mask, other=0).to(tl.int32) << 8)
        sc = tl.load(src + base + 66 + e // 32, mask=mask, other=0).to(tl.int32)
        s = (sc >> (4 * ((e // 16) % 2))) & 15
        lo = tl.load(src + base, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(src + base + 1, mask=mask, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        db = (d * (s.to(tl.float32) + 0.5)) * 0.25
        g = tl.load(aux + (entry & 511) * 8 + e % 8, mask=mask, other=0.0)
        return signed(db * g, entry >> 9, e % 8)
