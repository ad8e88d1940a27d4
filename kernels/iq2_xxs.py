"""IQ2_XXS: super-blocks of 256 weights, ``d: f16, qs: u16[32]`` (66 bytes, 2.0625 bpw).

Each 32-weight block ``ib`` takes 8 bytes of ``qs``: 4 lattice indices (one byte per group of 8 weights, into the
256-point IQ2 lattice of :mod:`._iq_grids`), then a little-endian u32 holding the 7 stored sign bits of each group
(bits ``7l``..``7l+6``, the 8th sign implied by parity) and a 4-bit scale ``s`` in bits 28..31.
``y = d * (0.5 + s) * 0.25 * grid[idx][j] * sign``.

``quantize`` is llama.cpp's ``quantize_row_iq2_xxs_impl``, which needs an importance matrix:
weights ``qw * sqrt(Σx²/256 + x²)``; per block, signs folded (:func:`._iq_common.fold_signs`), a start scale from
``make_qp_quants(32, 4)``, 13 trial grids ``(5 + 0.1 * is) / (3 * scale)`` snapped to the lattice, the best
least-squares scale kept, one more snap at that scale and a final least-squares scale; then ``d = max_scale / 31``
and ``s = nearest(0.5 * (scale / d - 1))``.
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
    lsq,
    qp_scale,
    quantize_lattice,
    safe_inv,
    sign_bits,
    snap,
)
from ._iq_grids import dequant_grid, search_tables
from ._legacy_common import fdiv, put_f16
from ._search import f32, sqrt_f32
from ._triton import HAVE_TRITON, tl, triton

FMT = get_format("iq2_xxs")
QK = FMT.block_size
LATTICE = "iq2_256"
KMAX = 3
EPS = 1e-15


def _encode(x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor) -> None:
    """Float32 rows ``(rows, n)`` -> packed super-blocks ``out`` ``(rows * n / 256, 66)``."""
    t = search_tables(LATTICE, 2, KMAX - 1, x.device)
    xb = x.reshape(-1, QK)
    nbl = xb.shape[0]
    qwb = qw.reshape(1, -1, QK).expand(x.shape[0], -1, -1).reshape(-1, QK)
    w = importance(xb, qwb, 1.0).reshape(-1, 32)
    xs = xb.reshape(-1, 32)
    waux = sqrt_f32(w)
    xval, signs = fold_signs(xs, w)
    live = ~(xval.amax(dim=1) < EPS)
    scale = qp_scale(xval, KMAX + 1, w)
    eff_max = scale * float(KMAX)
    live &= ~(eff_max <= 0)
    eff_max = torch.where(live, eff_max, torch.ones_like(eff_max))
    best = torch.zeros_like(scale)
    q = torch.zeros_like(xval)
    for k in range(-6, 7):
        inv = torch.full_like(eff_max, f32(2 * KMAX - 1 + f32(k * f32(0.1)))) / eff_max
        qa = snap(t, xval, waux, inv, torch.full_like(inv, 1.0) / inv, KMAX)[0]
        sumqx, sumq2 = lsq(w, xval, qa)
        acc = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = torch.where(acc, sumqx / torch.where(acc, sumq2, torch.ones_like(sumq2)), scale)
        best = torch.where(acc, scale * sumqx, best)
        q = torch.where(acc[:, None], qa, q)
    pos = live & (scale > 0)
    sc = torch.where(pos, scale, torch.ones_like(scale))
    q = torch.where(pos[:, None], snap(t, xval, waux, safe_inv(sc, pos), sc, KMAX)[0], q)
    sumqx, sumq2 = lsq(w, xval, q)
    upd = pos & (sumq2 > 0)
    scale = torch.where(upd, sumqx / torch.where(upd, sumq2, torch.ones_like(sumq2)), scale)
    neg = scale < 0
    scale = torch.where(neg, -scale, scale)
    signs = torch.where(neg[:, None], (~signs) & 127, signs)
    idx = lattice_indices(t, q)
    scale = torch.where(live, scale, 0.0).reshape(nbl, 8)
    max_scale = scale.amax(dim=1).clamp(min=0.0)
    d = fdiv(max_scale, 31.0)
    ls = block_scale_codes(scale, d)
    shifts = 7 * torch.arange(4, device=x.device)
    sign_word = torch.where(live[:, None], signs << shifts, 0).sum(dim=1).reshape(nbl, 8)
    idx_word = (idx << (8 * torch.arange(4, device=x.device))).mul(live[:, None]).sum(dim=1).reshape(nbl, 8)
    words = torch.stack([idx_word, sign_word | (ls << 28)], dim=2).reshape(nbl, 16)
    words = torch.where((max_scale > 0)[:, None], words, 0)
    put_f16(out, 0, d)
    out[:, 2:] = le_bytes(words, 4)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/256*66)`` uint8. ``imatrix`` ``(n,)`` is required, as in llama.cpp."""
    if imatrix is None:
        raise ImatrixRequired(
            "iq2_xxs needs an importance matrix (llama.cpp refuses to make it without one); "
            "compute one with `quantforge calibrate` and pass it with --imatrix"
        )
    tables = search_tables(LATTICE, 2, KMAX - 1)
    return quantize_lattice(weight, imatrix, "iq2_xxs", FMT.type_size, tables, _encode)


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = as_byte_blocks(data, FMT.type_size)
    nb = b.shape[0]
    d = bytes_to_f16(b[:, :2])
    blk = b[:, 2:].reshape(nb, 8, 8).to(torch.int64)
    word = (blk[:, :, 4:] << (8 * torch.arange(4, device=data.device))).sum(dim=2)
    db = (d * ((word >> 28).to(torch.float32) + 0.5)) * 0.25
    grid = dequant_grid(LATTICE, data.device)[blk[:, :, :4]]
    neg = sign_bits((word[:, :, None] >> (7 * torch.arange(4, device=data.device))) & 127)
    y = db[:, :, None, None] * grid
    y = torch.where(neg, -y, y)
    return y.to(dtype).reshape(data.shape[0], -1)


tile_aux, dequantize_triton = _iq_common.codec_entry_points(FMT, LATTICE)


if HAVE_TRITON:
    from ._iq_common import signed, u32_at

    @triton.jit
    def iq2_xxs_tile(src, aux, row, col, stride, mask):
        """IQ2_XXS tile (signature of :mod:`.tiles`); ``aux`` = :func:`tile_aux`."""
        base = row.to(tl.int64) * stride + (col // 256).to(tl.int64) * 66
        e = (col % 256).to(tl.int32)
        ib = e // 32
        j = e % 32
        idx = tl.load(src + base + 2 + 8 * ib + j // 8, mask=mask, other=0).to(tl.int32)
        word = u32_at(src, base + 6 + 8 * ib, mask)
        lo = tl.load(src + base, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(src + base + 1, mask=mask, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        db = (d * ((word >> 28).to(tl.float32) + 0.5)) * 0.25
        g = tl.load(aux + idx * 8 + j % 8, mask=mask, other=0.0)
        return signed(db * g, ((word >> (7 * (j // 8))) & 127).to(tl.int32), j % 8)
