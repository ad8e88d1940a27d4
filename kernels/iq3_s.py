"""IQ3_S: super-blocks of 256 weights, ``d: f16, qs: u8[64], qh: u8[8], signs: u8[32], scales: u8[4]`` (110 bytes,
3.4375 bpw).

Each group of 4 weights is a 9-bit index into the 512-point IQ3 lattice of :mod:`._iq_grids`: the low 8 bits in
``qs``, the 9th at bit ``g % 8`` of ``qh[g / 8]``. ``signs`` holds one full sign byte per group of 8 weights (no
parity trick), and each 32-weight block ``ib`` a 4-bit scale ``s`` (nibble ``ib % 2`` of ``scales[ib / 2]``):
``y = d * (1 + 2s) * grid * sign``.

``quantize`` is llama.cpp's ``quantize_row_iq3_s_impl`` (block size 32): weights ``qw * sqrt(2Σx²/256 + x²)``
with an imatrix, ``x²`` without; ``xval = |x|``; the trial search of :func:`._iq_common.trial_search` over 19 grids
``(15 + 0.2 k) / max`` in its IQ3_S variant; then ``d = max_scale / 31`` stored as ``fp16(1.033 d)``. As in ggml,
an all-zero block is skipped without advancing the ``qs`` / ``signs`` write position, so the following blocks'
codes move down by one slot (``qh`` and the scales stay in place).
"""

from __future__ import annotations

import torch

from ..formats import get_format
from . import _iq_common
from ._blocks import as_byte_blocks, bytes_to_f16
from ._iq_common import block_scale_codes, importance, lattice_indices, quantize_lattice, trial_search
from ._iq_grids import dequant_grid, search_tables
from ._legacy_common import fdiv, put_f16
from ._search import f32, sqrt_f32
from ._triton import HAVE_TRITON, tl, triton

FMT = get_format("iq3_s")
QK = FMT.block_size
LATTICE = "iq3_512"
KMAX = 8


def _encode(x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor) -> None:
    """Float32 rows ``(rows, n)`` -> packed super-blocks ``out`` ``(rows * n / 256, 110)``."""
    t = search_tables(LATTICE, 3, KMAX - 1, x.device)
    xb = x.reshape(-1, QK)
    nbl = xb.shape[0]
    qwb = None if qw is None else qw.reshape(1, -1, QK).expand(x.shape[0], -1, -1).reshape(-1, QK)
    w = importance(xb, qwb, 2.0).reshape(-1, 32)
    xs = xb.reshape(-1, 32)
    neg = ~(xs >= 0)
    xval = torch.where(neg, -xs, xs)
    signs = (neg.reshape(-1, 4, 8).to(torch.int64) << torch.arange(8, device=x.device)).sum(dim=2)
    mx = xval.amax(dim=1)
    live = mx != 0
    scale, q = trial_search(t, xval, w, sqrt_f32(w), live, mx, 2 * KMAX - 1, 0.2, 9, KMAX, resnap_all=True)
    flip = scale < 0
    scale = torch.where(flip, -scale, scale)
    signs = torch.where(flip[:, None], (~signs) & 255, signs)
    idx = lattice_indices(t, q)
    slot = torch.cumsum(live.reshape(nbl, 8).to(torch.int64), dim=1) - 1
    dest = (torch.arange(nbl, device=x.device)[:, None] * 8 + slot).reshape(-1)[live]
    qs = torch.zeros((nbl * 8, 8), dtype=torch.int64, device=x.device)
    qs[dest] = (idx & 255)[live]
    sg = torch.zeros((nbl * 8, 4), dtype=torch.int64, device=x.device)
    sg[dest] = signs[live]
    qh = torch.where(live[:, None], (idx >> 8) << torch.arange(8, device=x.device), 0).sum(dim=1)
    scale = torch.where(live, scale, 0.0).reshape(nbl, 8)
    max_scale = scale.amax(dim=1).clamp(min=0.0)
    d = fdiv(max_scale, 31.0)
    ls = block_scale_codes(scale, d)
    put_f16(out, 0, d * f32(1.033))
    out[:, 2:66] = qs.reshape(nbl, 64).to(torch.uint8)
    out[:, 66:74] = qh.reshape(nbl, 8).to(torch.uint8)
    out[:, 74:106] = sg.reshape(nbl, 32).to(torch.uint8)
    out[:, 106:110] = torch.where((max_scale > 0)[:, None], ls[:, 0::2] | (ls[:, 1::2] << 4), 0).to(torch.uint8)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/256*110)`` uint8; ``imatrix`` ``(n,)`` weights the search."""
    tables = search_tables(LATTICE, 3, KMAX - 1)
    return quantize_lattice(weight, imatrix, "iq3_s", FMT.type_size, tables, _encode)


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = as_byte_blocks(data, FMT.type_size)
    nb = b.shape[0]
    d = bytes_to_f16(b[:, :2])
    qh = b[:, 66:74].to(torch.int64)
    hi = (qh[:, :, None] >> torch.arange(8, device=data.device)) & 1
    idx = b[:, 2:66].to(torch.int64).reshape(nb, 8, 8) | (hi << 8)
    sc = b[:, 106:110].to(torch.int64)
    s = torch.stack([sc & 15, sc >> 4], dim=2).reshape(nb, 8)
    db = d * (1 + 2 * s).to(torch.float32)
    grid = dequant_grid(LATTICE, data.device)[idx].reshape(nb, 8, 4, 8)
    neg = ((b[:, 74:106].to(torch.int64).reshape(nb, 8, 4, 1) >> torch.arange(8, device=data.device)) & 1).bool()
    y = db[:, :, None, None] * grid
    y = torch.where(neg, -y, y)
    return y.to(dtype).reshape(data.shape[0], -1)


tile_aux, dequantize_triton = _iq_common.codec_entry_points(FMT, LATTICE)


if HAVE_TRITON:

    @triton.jit
    def iq3_s_tile(src, aux, row, col, stride, mask):
        """IQ3_S tile (signature of :mod:`.tiles`); ``aux`` = :func:`tile_aux`."""
        base = row.to(tl.int64) * stride + (col // 256).to(tl.int64) * 110
        e = (col % 256).to(tl.int32)
        g = e // 4
        ib = e // 32
        qh = tl.load(src + base + 66 + g // 8, mask=mask, other=0).to(tl.int32)
        idx = tl.load(src + base + 2 + g, mask=mask, other=0).to(tl.int32) | (((qh >> (g % 8)) & 1) << 8)
        sc = tl.load(src + base + 106 + ib // 2, mask=mask, other=0).to(tl.int32)
        s = (sc >> (4 * (ib % 2))) & 15
        lo = tl.load(src + base, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(src + base + 1, mask=mask, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        db = d * (1 + 2 * s).to(tl.float32)
        sgn = tl.load(src + base + 74 + e // 8, mask=mask, other=0).to(tl.int32)
        y = db * tl.load(aux + idx * 4 + e % 4, mask=mask, other=0.0)
        return tl.where(((sgn >> (e % 8)) & 1) != 0, -y, y)
