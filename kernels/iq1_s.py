"""IQ1_S: super-blocks of 256 weights, ``d: f16, qs: u8[32], qh: u16[8]`` (50 bytes, 1.5625 bpw).

Each group of 8 weights is an 11-bit index into the 2048-point ternary lattice of :mod:`._iq_grids` (levels -1,
0, 1): the low 8 bits in ``qs``, the high 3 bits at bits ``3l`` of its block's ``qh`` entry. Each 32-weight block
``ib`` has a 3-bit scale ``s`` (``qh[ib]`` bits 12..14) and a shift sign (bit 15):
``y = d * (2s + 1) * (grid + delta)``, ``delta = -0.125`` when bit 15 is set, else ``+0.125``.

``quantize`` is llama.cpp's ``quantize_row_iq1_s_impl``, which needs an importance matrix: weights
``qw * sqrt(2Σx²/256 + x²)``; per block, the weights sorted ascending (stable, as glibc's merge-sort ``qsort``),
an exhaustive search over the two split points into levels -1, 0, 1 with both shifts (``x_p = level + 0.125``,
``x_m = level - 0.125``) keeping the strictly best ``(Σwxq)² / Σwq²``; groups off the lattice move to their
neighbour of least weighted error (ggml ``iq1_find_best_neighbour2``), then the scale is refit; finally
``d = max_scale / 15`` stored as ``fp16(1.125 d)`` and ``s = nearest(0.5 * (scale / d - 1))`` in 0..7.
"""

from __future__ import annotations

import torch

from ..errors import ImatrixRequired
from ..formats import get_format
from . import _iq_common
from ._blocks import as_byte_blocks, bytes_to_f16
from ._iq_common import importance, le_bytes, quantize_lattice
from ._iq_grids import SearchTables, dequant_grid, search_tables
from ._legacy_common import fdiv, put_f16
from ._search import f32
from ._triton import HAVE_TRITON, tl, triton

FMT = get_format("iq1_s")
QK = FMT.block_size
LATTICE = "iq1_2048"
EPS = 1e-12
DELTA = 0.125
X_P = (-1 + DELTA, DELTA, 1 + DELTA)
X_M = (-1 - DELTA, -DELTA, 1 - DELTA)


def _prefix(t: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` -> ``(B, n + 1)`` running sums from 0, left to right."""
    out = torch.zeros((t.shape[0], t.shape[1] + 1), dtype=t.dtype, device=t.device)
    for j in range(t.shape[1]):
        out[:, j + 1] = out[:, j] + t[:, j]
    return out


def split_search(xs: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exhaustive split search of ``quantize_row_iq1_s_impl`` on blocks ``(B, n)``.

    Returns ``(found (B,) bool, scale (B,), shift (B,) +-1, levels (B, n) int64 in 0..2)`` in the weights' order,
    after ggml's sign normalization (a negative scale flips levels and shift).
    """
    B, n = xs.shape
    order = torch.sort(xs, dim=1, stable=True).indices
    ws = w.gather(1, order)
    sx = _prefix(ws * xs.gather(1, order))
    sw = _prefix(ws)
    i1, i2 = torch.triu_indices(n + 1, n + 1, device=xs.device)
    a, b, c = sx[:, i1] - sx[:, :1], sx[:, i2] - sx[:, i1], sx[:, n:] - sx[:, i2]
    wa, wb, wc = sw[:, i1] - sw[:, :1], sw[:, i2] - sw[:, i1], sw[:, n:] - sw[:, i2]
    cands = []
    for p in (X_P, X_M):
        p0, p1, p2 = (f32(v) for v in p)
        cands.append(((a * p0 + b * p1) + c * p2, ((wa * p0) * p0 + (wb * p1) * p1) + (wc * p2) * p2))
    sqx = torch.stack([cands[0][0], cands[1][0]], dim=2).reshape(B, -1)
    sq2 = torch.stack([cands[0][1], cands[1][1]], dim=2).reshape(B, -1)
    best = torch.full((B,), torch.finfo(torch.float32).min, device=xs.device)
    scale = torch.zeros(B, device=xs.device)
    pick = torch.full((B,), -1, dtype=torch.int64, device=xs.device)
    for k in range(sqx.shape[1]):
        qx, q2 = sqx[:, k], sq2[:, k]
        acc = (q2 > 0) & (qx * qx > best * q2)
        scale = torch.where(acc, qx / torch.where(acc, q2, torch.ones_like(q2)), scale)
        best = torch.where(acc, scale * qx, best)
        pick = torch.where(acc, k, pick)
    found = pick >= 0
    k = pick.clamp(min=0)
    shift = 1 - 2 * (k % 2)
    j = torch.arange(n, device=xs.device)
    sorted_levels = (j >= i1[k // 2][:, None]).to(torch.int64) + (j >= i2[k // 2][:, None]).to(torch.int64)
    levels = torch.empty_like(sorted_levels).scatter_(1, order, sorted_levels)
    neg = scale < 0
    levels = torch.where(neg[:, None], 2 - levels, levels)
    return found, torch.where(neg, -scale, scale), torch.where(neg, -shift, shift), levels


def shifted_values(shift: torch.Tensor) -> torch.Tensor:
    """``(B,)`` shifts -> ``(B, 3)`` float32 level values ``x_p`` (shift 1) or ``x_m`` (shift -1)."""
    xp = torch.tensor(X_P, dtype=torch.float32, device=shift.device)
    xm = torch.tensor(X_M, dtype=torch.float32, device=shift.device)
    return torch.where((shift == 1)[:, None], xp, xm)


def snap_shifted(
    t: SearchTables, xs: torch.Tensor, w: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor, xx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lattice index per group of 8 ``(B, n/8)`` for levels ``(B, n)``; a group off the lattice takes its neighbour
    of least ``Σ w * (scale * xx[level] - x)²`` (first on ties; ``xx``: ``(B, n/8, 3)`` level values per group).
    Also returns which groups were off."""
    B, n = xs.shape
    lv = levels.reshape(B, n // 8, 8)
    key = (lv << (2 * torch.arange(8, device=xs.device))).sum(dim=2)
    idx = t.map[key]
    off = idx < 0
    if bool(off.any()):
        nb = t.neighbours[t.row[key[off]]]
        lvl = ((t.coords[nb.clamp(min=0)] - 1.0) * 0.5).to(torch.int64)
        bi = torch.arange(B, device=xs.device)[:, None].expand(B, n // 8)[off]
        q = xx[off][:, None, :].expand(-1, nb.shape[1], -1).gather(2, lvl)
        diff = scale[bi][:, None, None] * q - xs.reshape(B, n // 8, 8)[off][:, None, :]
        terms = (w.reshape(B, n // 8, 8)[off][:, None, :] * diff) * diff
        d2 = terms[:, :, 0] + 0.0
        for i in range(1, 8):
            d2 = d2 + terms[:, :, i]
        d2 = torch.where(nb >= 0, d2, torch.inf)
        idx = idx.masked_scatter(off, nb.gather(1, d2.argmin(dim=1, keepdim=True)).squeeze(1))
    return idx, off


def refit(t: SearchTables, xs: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor,
          xx: torch.Tensor, redo: torch.Tensor) -> torch.Tensor:
    """ggml's refit after a neighbour move: ``Σ w q x / Σ w q q`` over the chosen points where both are > 0."""
    B, n = xs.shape
    lvl = ((t.coords[idx] - 1.0) * 0.5).to(torch.int64)
    q = xx.gather(2, lvl).reshape(B, n)
    sumqx, sumq2 = _iq_common.rowsum((w * q) * xs), _iq_common.rowsum((w * q) * q)
    ok = redo & (sumqx > 0) & (sumq2 > 0)
    return torch.where(ok, sumqx / torch.where(ok, sumq2, torch.ones_like(sumq2)), scale)


def _encode(x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor) -> None:
    """Float32 rows ``(rows, n)`` -> packed super-blocks ``out`` ``(rows * n / 256, 50)``."""
    t = search_tables(LATTICE, 3, 2, x.device)
    xb = x.reshape(-1, QK)
    nbl = xb.shape[0]
    qwb = qw.reshape(1, -1, QK).expand(x.shape[0], -1, -1).reshape(-1, QK)
    w = importance(xb, qwb, 2.0).reshape(-1, 32)
    xs = xb.reshape(-1, 32)
    found, scale, shift, levels = split_search(xs, w)
    live = ~(xs.abs().amax(dim=1) < EPS) & found
    xx = shifted_values(shift)[:, None, :].expand(-1, 4, -1)
    idx, off = snap_shifted(t, xs, w, levels, scale, xx)
    scale = refit(t, xs, w, idx, scale, xx, off.any(dim=1))
    idx = torch.where(live[:, None], idx, 0)
    scale = torch.where(live, scale, 0.0)
    shift = torch.where(live, shift, 1)
    hi = ((idx >> 8) << (3 * torch.arange(4, device=x.device))).sum(dim=1).reshape(nbl, 8)
    max_scale = scale.reshape(nbl, 8).amax(dim=1).clamp(min=0.0)
    d = fdiv(max_scale, 15.0)
    inv = torch.where(d != 0, torch.full_like(d, 1.0) / torch.where(d != 0, d, torch.ones_like(d)), 0.0)
    ls = torch.round((inv[:, None] * scale.reshape(nbl, 8) - 1.0) * 0.5).clamp_(0, 7).to(torch.int64)
    ls = ls | torch.where(shift.reshape(nbl, 8) == -1, 8, 0)
    hi = torch.where((max_scale > 0)[:, None], hi | (ls << 12), hi)
    put_f16(out, 0, d * f32(1.125))
    out[:, 2:34] = (idx & 255).reshape(nbl, 32).to(torch.uint8)
    out[:, 34:50] = le_bytes(hi, 2)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/256*50)`` uint8. ``imatrix`` ``(n,)`` is required, as in llama.cpp."""
    if imatrix is None:
        raise ImatrixRequired(
            "iq1_s needs an importance matrix (llama.cpp refuses to make it without one); "
            "compute one with `quantforge calibrate` and pass it with --imatrix"
        )
    tables = search_tables(LATTICE, 3, 2)
    return quantize_lattice(weight, imatrix, "iq1_s", FMT.type_size, tables, _encode)


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = as_byte_blocks(data, FMT.type_size)
    nb = b.shape[0]
    d = bytes_to_f16(b[:, :2])
    qh = b[:, 34:50].to(torch.int64).reshape(nb, 8, 2)
    qh = qh[:, :, 0] | (qh[:, :, 1] << 8)
    dl = d * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)
    delta = torch.where((qh & 0x8000) != 0, -DELTA, DELTA).to(torch.float32)
    hi = (qh[:, :, None] >> (3 * torch.arange(4, device=data.device))) & 7
    idx = b[:, 2:34].to(torch.int64).reshape(nb, 8, 4) | (hi << 8)
    grid = dequant_grid(LATTICE, data.device)[idx]
    y = dl[:, :, None, None] * (grid + delta[:, :, None, None])
    return y.to(dtype).reshape(data.shape[0], -1)


tile_aux, dequantize_triton = _iq_common.codec_entry_points(FMT, LATTICE)


if HAVE_TRITON:

    @triton.jit
    def iq1_s_tile(src, aux, row, col, stride, mask):
        """IQ1_S tile (signature of :mod:`.tiles`); ``aux`` = :func:`tile_aux`."""
        base = row.to(tl.int64) * stride + (col // 256).to(tl.int64) * 50
        e = (col % 256).to(tl.int32)
        ib = e // 32
        grp = e // 8
        qh = tl.load(src + base + 34 + 2 * ib, mask=mask, other=0).to(tl.int32) | (
            tl.load(src + base + 35 + 2 * ib, mask=mask, other=0).to(tl.int32) << 8)
        idx = tl.load(src + base + 2 + grp, mask=mask, other=0).to(tl.int32) | (((qh >> (3 * (grp % 4))) & 7) << 8)
        lo = tl.load(src + base, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(src + base + 1, mask=mask, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        dl = d * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
        delta = tl.where((qh & 0x8000) != 0, -0.125, 0.125)
        g = tl.load(aux + idx * 8 + e % 8, mask=mask, other=0.0)
        return dl * (g + delta)
