"""IQ2_S: super-blocks of 256 weights, ``d: f16, qs: u8[64], qh: u8[8], scales: u8[8]`` (82 bytes, 2.5625 bpw).

Each group ``g`` of 8 weights is a 10-bit index into the 1024-point IQ2 lattice of :mod:`._iq_grids`: the low 8
bits in ``qs[g]``, the top 2 at bits ``2(g % 4)`` of ``qh[g / 4]``; ``qs[32 + g]`` is the group's full sign byte.
Each 16-weight block ``ib`` has a 4-bit scale ``s`` (nibble ``ib % 2`` of ``scales[ib / 2]``):
``y = d * (0.5 + s) * 0.25 * grid * sign``.

``quantize`` is llama.cpp's ``quantize_row_iq2_s_impl``: weights ``qw * sqrt(2Σx²/256 + x²)`` with an imatrix,
``0.25 * 2Σx²/256 + x²`` without; ``xval = |x|``; the trial search of :func:`._iq_common.trial_search` over 19
grids ``(5 + 0.1 k) / max`` per 16-weight block (one neighbour distance); then ``d = max_scale / 31`` stored as
``fp16(0.9875 d)`` and ``s = nearest(0.5 * (scale / d - 1))``.
"""

from __future__ import annotations

import torch

from ..formats import get_format
from . import _iq_common
from ._blocks import as_byte_blocks, bytes_to_f16
from ._iq_common import block_scale_codes, lattice_indices, quantize_lattice, rowsum, trial_search
from ._iq_grids import dequant_grid, search_tables
from ._legacy_common import fdiv, put_f16
from ._search import f32, sqrt_f32
from ._triton import HAVE_TRITON, tl, triton

FMT = get_format("iq2_s")
QK = FMT.block_size
LATTICE = "iq2_1024"
KMAX = 3
EPS = 1e-8


def _encode(x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor) -> None:
    """Float32 rows ``(rows, n)`` -> packed super-blocks ``out`` ``(rows * n / 256, 82)``."""
    t = search_tables(LATTICE, 1, KMAX - 1, x.device)
    xb = x.reshape(-1, QK)
    nbl = xb.shape[0]
    x2 = xb * xb
    sigma2 = (rowsum(x2) * 2.0) / torch.full((nbl,), float(QK), device=x.device)
    if qw is None:
        w = (sigma2 * 0.25)[:, None] + x2
    else:
        w = qw.reshape(1, -1, QK).expand(x.shape[0], -1, -1).reshape(-1, QK) * sqrt_f32(x2 + sigma2[:, None])
    w = w.reshape(-1, 16)
    xs = xb.reshape(-1, 16)
    neg = ~(xs >= 0)
    xval = torch.where(neg, -xs, xs)
    signs = (neg.reshape(-1, 2, 8).to(torch.int64) << torch.arange(8, device=x.device)).sum(dim=2)
    mx = xval.amax(dim=1)
    live = ~(mx < f32(EPS))
    scale, q = trial_search(t, xval, w, sqrt_f32(w), live, mx, 2 * KMAX - 1, 0.1, 9, KMAX)
    flip = scale < 0
    scale = torch.where(flip, -scale, scale)
    signs = torch.where(flip[:, None], (~signs) & 255, signs)
    idx = torch.where(live[:, None], lattice_indices(t, q), 0).reshape(nbl, 32)
    signs = torch.where(live[:, None], signs, 0).reshape(nbl, 32)
    qh = ((idx >> 8).reshape(nbl, 8, 4) << (2 * torch.arange(4, device=x.device))).sum(dim=2)
    scale = torch.where(live, scale, 0.0).reshape(nbl, 16)
    max_scale = scale.amax(dim=1).clamp(min=0.0)
    d = fdiv(max_scale, 31.0)
    ls = block_scale_codes(scale, d)
    put_f16(out, 0, d * f32(0.9875))
    out[:, 2:34] = (idx & 255).to(torch.uint8)
    out[:, 34:66] = signs.to(torch.uint8)
    out[:, 66:74] = qh.to(torch.uint8)
    out[:, 74:82] = torch.where((max_scale > 0)[:, None], ls[:, 0::2] | (ls[:, 1::2] << 4), 0).to(torch.uint8)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/256*82)`` uint8; ``imatrix`` ``(n,)`` weights the search."""
    tables = search_tables(LATTICE, 1, KMAX - 1)
    return quantize_lattice(weight, imatrix, "iq2_s", FMT.type_size, tables, _encode)


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = as_byte_blocks(data, FMT.type_size)
    nb = b.shape[0]
    d = bytes_to_f16(b[:, :2])
    qh = b[:, 66:74].to(torch.int64)
    hi = ((qh[:, :, None] >> (2 * torch.arange(4, device=data.device))) & 3).reshape(nb, 32)
    idx = b[:, 2:34].to(torch.int64) | (hi << 8)
    sc = b[:, 74:82].to(torch.int64)
    s = torch.stack([sc & 15, sc >> 4], dim=2).reshape(nb, 16)
    db = (d * (s.to(torch.float32) + 0.5)) * 0.25
    grid = dequant_grid(LATTICE, data.device)[idx]
    neg = ((b[:, 34:66].to(torch.int64)[:, :, None] >> torch.arange(8, device=data.device)) & 1).bool()
    y = db.repeat_interleave(2, dim=1)[:, :, None] * grid
    y = torch.where(neg, -y, y)
    return y.to(dtype).reshape(data.shape[0], -1)


tile_aux, dequantize_triton = _iq_common.codec_entry_points(FMT, LATTICE)


if HAVE_TRITON:

    @triton.jit
    def iq2_s_tile(src, aux, row, col, stride, mask):
        """IQ2_S tile (signature of :mod:`.tiles`); ``aux`` = :func:`tile_aux`."""
        base = row.to(tl.int64) * stride + (col // 256).to(tl.int64) * 82
        e = (col % 256).to(tl.int32)
        g = e // 8
        qh = tl.load(src + base + 66 + g // 4, mask=mask, other=0).to(tl.int32)
        idx = tl.load(src + base + 2 + g, mask=mask, other=0).to(tl.int32) | (((qh >> (2 * (g % 4))) & 3) << 8)
        sc = tl.load(src + base + 74 + e // 32, mask=mask, other=0).to(tl.int32)
        s = (sc >> (4 * ((e // 16) % 2))) & 15
        lo = tl.load(src + base, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(src + base + 1, mask=mask, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        db = (d * (s.to(tl.float32) + 0.5)) * 0.25
        sgn = tl.load(src + base + 34 + g, mask=mask, other=0).to(tl.int32)
        y = db * tl.load(aux + idx * 8 + e % 8, mask=mask, other=0.0)
        return tl.where(((sgn >> (e % 8)) & 1) != 0, -y, y)
