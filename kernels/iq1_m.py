"""IQ1_M: super-blocks of 256 weights, ``qs: u8[32], qh: u8[16], scales: u16[4]`` (56 bytes, 1.75 bpw).

Groups of 8 weights index the 2048-point ternary lattice of IQ1_S (:mod:`._iq_grids`): the low 8 bits in ``qs``,
the high 3 bits in ``qh[b]`` (bits 0..2 for the first group of 16-weight block ``b``, 4..6 for the second), and a
per-group shift sign (bits 3 and 7). Each 16-weight block has a 3-bit scale ``s`` (bits ``3(b%4)`` of
``scales[b/4]``); the fp16 super-block scale ``d`` is spread over the top nibbles of the four ``scales`` words:
``y = d * (2s + 1) * (grid + delta)``, ``delta = -0.125`` when the group's shift bit is set, else ``+0.125``.

``quantize`` is llama.cpp's ``quantize_row_iq1_m_impl``: weights ``qw * sqrt(2Σx²/256 + x²)`` (``x²`` without an
imatrix); per 16-weight block, the exhaustive split search of IQ1_S where each half of 8 picks its own shift
(4 combinations per split), neighbour moves and a refit; then ``d = max_scale / 15``, 3-bit block scales, and a
final least-squares refit of ``d`` over the whole super-block, stored as ``fp16(1.1125 d)``.
"""

from __future__ import annotations

import torch

from ..formats import get_format
from . import _iq_common
from ._blocks import as_byte_blocks, bytes_to_f16
from ._iq_common import importance, le_bytes, quantize_lattice
from ._iq_grids import dequant_grid, search_tables
from ._legacy_common import fdiv
from ._search import f32
from ._triton import HAVE_TRITON, tl, triton
from .iq1_s import DELTA, LATTICE, X_M, X_P, refit, snap_shifted

FMT = get_format("iq1_m")
QK = FMT.block_size
EPS = 1e-7
MASKS = (0x00, 0x80, 0x08, 0x88)


def _half_prefix(v: torch.Tensor, half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Running sums of ``v`` ``(B, n)`` (sorted order) split by the half each element came from."""
    p = [torch.zeros((v.shape[0], v.shape[1] + 1), dtype=v.dtype, device=v.device) for _ in range(2)]
    for j in range(v.shape[1]):
        h = half[:, j]
        p[0][:, j + 1] = torch.where(h, p[0][:, j], p[0][:, j] + v[:, j])
        p[1][:, j + 1] = torch.where(h, p[1][:, j] + v[:, j], p[1][:, j])
    return p[0], p[1]


def split_search(xs: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The split search of ``quantize_row_iq1_m_impl`` on blocks ``(B, 16)``: ``(found, scale, k, levels)``, ``k``
    the shift pair (0: ++, 1: +-, 2: -+, 3: --, first half then second), after ggml's sign normalization."""
    B, n = xs.shape
    order = torch.sort(xs, dim=1, stable=True).indices
    ws = w.gather(1, order)
    half = order >= n // 2
    px = _half_prefix(ws * xs.gather(1, order), half)
    pw = _half_prefix(ws, half)
    xp = torch.tensor(X_P, dtype=torch.float32)
    xm = torch.tensor(X_M, dtype=torch.float32)
    p2, m2 = float(xp[2]), float(xm[2])
    cp1, cp2 = float(xp[0] * xp[0] - xp[1] * xp[1]), float(xp[1] * xp[1] - xp[2] * xp[2])
    cm1, cm2 = float(xm[0] * xm[0] - xm[1] * xm[1]), float(xm[1] * xm[1] - xm[2] * xm[2])
    i1, i2 = torch.triu_indices(n + 1, n + 1, device=xs.device)
    qxp, qxm, q2p, q2m = [], [], [], []
    for h in range(2):
        tx, tw = px[h][:, n:], pw[h][:, n:]
        sx = px[h][:, i1] + px[h][:, i2]
        qxp.append(tx * p2 - sx)
        qxm.append(tx * m2 - sx)
        q2p.append(((tw * p2) * p2 + pw[h][:, i1] * cp1) + pw[h][:, i2] * cp2)
        q2m.append(((tw * m2) * m2 + pw[h][:, i1] * cm1) + pw[h][:, i2] * cm2)
    sqx = torch.stack([qxp[0] + qxp[1], qxp[0] + qxm[1], qxm[0] + qxp[1], qxm[0] + qxm[1]], dim=2).reshape(B, -1)
    sq2 = torch.stack([q2p[0] + q2p[1], q2p[0] + q2m[1], q2m[0] + q2p[1], q2m[0] + q2m[1]], dim=2).reshape(B, -1)
    best = torch.full((B,), torch.finfo(torch.float32).min, device=xs.device)
    scale = torch.zeros(B, device=xs.device)
    pick = torch.full((B,), -1, dtype=torch.int64, device=xs.device)
    for c in range(sqx.shape[1]):
        qx, q2 = sqx[:, c], sq2[:, c]
        acc = (q2 > 0) & (qx * qx > best * q2)
        scale = torch.where(acc, qx / torch.where(acc, q2, torch.ones_like(q2)), scale)
        best = torch.where(acc, scale * qx, best)
        pick = torch.where(acc, c, pick)
    found = pick >= 0
    c = pick.clamp(min=0)
    k = c % 4
    j = torch.arange(n, device=xs.device)
    sorted_levels = (j >= i1[c // 4][:, None]).to(torch.int64) + (j >= i2[c // 4][:, None]).to(torch.int64)
    levels = torch.empty_like(sorted_levels).scatter_(1, order, sorted_levels)
    neg = scale < 0
    levels = torch.where(neg[:, None], 2 - levels, levels)
    return found, torch.where(neg, -scale, scale), torch.where(neg, 3 - k, k), levels


def group_values(k: torch.Tensor) -> torch.Tensor:
    """Shift pairs ``(B,)`` -> ``(B, 2, 3)`` level values of the block's two groups of 8."""
    xp = torch.tensor(X_P, dtype=torch.float32, device=k.device)
    xm = torch.tensor(X_M, dtype=torch.float32, device=k.device)
    first = torch.where((k < 2)[:, None], xp, xm)
    second = torch.where((k % 2 == 0)[:, None], xp, xm)
    return torch.stack([first, second], dim=1)


def _encode(x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor) -> None:
    """Float32 rows ``(rows, n)`` -> packed super-blocks ``out`` ``(rows * n / 256, 56)``."""
    t = search_tables(LATTICE, 3, 2, x.device)
    xb = x.reshape(-1, QK)
    nbl = xb.shape[0]
    qwb = None if qw is None else qw.reshape(1, -1, QK).expand(x.shape[0], -1, -1).reshape(-1, QK)
    w = importance(xb, qwb, 2.0).reshape(-1, 16)
    xs = xb.reshape(-1, 16)
    found, scale, k, levels = split_search(xs, w)
    live = ~(xs.abs().amax(dim=1) < f32(EPS)) & found
    idx, off = snap_shifted(t, xs, w, levels, scale, group_values(k))
    scale = refit(t, xs, w, idx, scale, group_values(k), off.any(dim=1))
    idx = torch.where(live[:, None], idx, 0)
    scale = torch.where(live, scale, 0.0).reshape(nbl, 16)
    k = torch.where(live, k, 0)
    qh = ((idx[:, 0] >> 8) | ((idx[:, 1] >> 8) << 4)).reshape(nbl, 16)
    max_scale = scale.amax(dim=1).clamp(min=0.0)
    has = max_scale > 0
    d = fdiv(max_scale, 15.0)
    inv = torch.where(has, torch.full_like(d, 1.0) / torch.where(has, d, torch.ones_like(d)), 0.0)
    ls = torch.round((inv[:, None] * scale - 1.0) * 0.5).clamp_(0, 7).to(torch.int64)
    sc = (ls.reshape(nbl, 4, 4) << (3 * torch.arange(4, device=x.device))).sum(dim=2)
    qh = torch.where(has[:, None], qh | torch.tensor(MASKS, device=x.device)[k].reshape(nbl, 16), qh)
    lvl = ((t.coords[idx] - 1.0) * 0.5).to(torch.int64)
    q = group_values(k).gather(2, lvl) * (2 * ls.reshape(-1, 1, 1) + 1).to(torch.float32)
    wq = w.reshape(-1, 2, 8) * q
    sumqx = _iq_common.rowsum((wq * xs.reshape(-1, 2, 8)).reshape(nbl, QK))
    sumq2 = _iq_common.rowsum((wq * q).reshape(nbl, QK))
    d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, torch.ones_like(sumq2)), d)
    s16 = (d * f32(1.1125)).to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    top = torch.stack([(s16 & 0xF) << 12, (s16 & 0xF0) << 8, (s16 & 0xF00) << 4, s16 & 0xF000], dim=1)
    sc = torch.where(has[:, None], sc | top, 0)
    out[:, 0:32] = (idx & 255).reshape(nbl, 32).to(torch.uint8)
    out[:, 32:48] = qh.to(torch.uint8)
    out[:, 48:56] = le_bytes(sc, 2)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/256*56)`` uint8; ``imatrix`` ``(n,)`` weights the search (llama.cpp's
    ``ggml_quantize_chunk`` makes IQ1_M without one; ``llama-quantize`` asks for one at the file level)."""
    tables = search_tables(LATTICE, 3, 2)
    return quantize_lattice(weight, imatrix, "iq1_m", FMT.type_size, tables, _encode)


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = as_byte_blocks(data, FMT.type_size)
    nb = b.shape[0]
    sc = b[:, 48:56].to(torch.int64).reshape(nb, 4, 2)
    sc = sc[:, :, 0] | (sc[:, :, 1] << 8)
    s16 = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
    d = bytes_to_f16(torch.stack([s16 & 255, s16 >> 8], dim=1).to(torch.uint8))
    ls = (sc[:, :, None] >> (3 * torch.arange(4, device=data.device))) & 7
    dl = d * (2 * ls.reshape(nb, 16) + 1).to(torch.float32)
    qh = b[:, 32:48].to(torch.int64)
    hi = torch.stack([qh & 7, (qh >> 4) & 7], dim=2)
    neg = torch.stack([(qh & 0x08) != 0, (qh & 0x80) != 0], dim=2)
    idx = b[:, 0:32].to(torch.int64).reshape(nb, 16, 2) | (hi << 8)
    delta = torch.where(neg, -DELTA, DELTA).to(torch.float32)
    grid = dequant_grid(LATTICE, data.device)[idx]
    y = dl[:, :, None, None] * (grid + delta[:, :, :, None])
    return y.to(dtype).reshape(data.shape[0], -1)


tile_aux, dequantize_triton = _iq_common.codec_entry_points(FMT, LATTICE)


if HAVE_TRITON:

    @triton.jit
    def iq1_m_tile(src, aux, row, col, stride, mask):
        """IQ1_M tile (signature of :mod:`.tiles`); ``aux`` = :func:`tile_aux`."""
        base = row.to(tl.int64) * stride + (col // 256).to(tl.int64) * 56
        e = (col % 256).to(tl.int32)
        blk = e // 16
        g = (e // 8) % 2
        s0 = tl.load(src + base + 48, mask=mask, other=0).to(tl.int32) | (
            tl.load(src + base + 49, mask=mask, other=0).to(tl.int32) << 8)
        s1 = tl.load(src + base + 50, mask=mask, other=0).to(tl.int32) | (
            tl.load(src + base + 51, mask=mask, other=0).to(tl.int32) << 8)
        s2 = tl.load(src + base + 52, mask=mask, other=0).to(tl.int32) | (
            tl.load(src + base + 53, mask=mask, other=0).to(tl.int32) << 8)
        s3 = tl.load(src + base + 54, mask=mask, other=0).to(tl.int32) | (
            tl.load(src + base + 55, mask=mask, other=0).to(tl.int32) << 8)
        bits = (s0 >> 12) | ((s1 >> 8) & 0xF0) | ((s2 >> 4) & 0xF00) | (s3 & 0xF000)
        d = bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        scw = tl.load(src + base + 48 + 2 * (blk // 4), mask=mask, other=0).to(tl.int32) | (
            tl.load(src + base + 49 + 2 * (blk // 4), mask=mask, other=0).to(tl.int32) << 8)
        dl = d * (2 * ((scw >> (3 * (blk % 4))) & 7) + 1).to(tl.float32)
        qh = tl.load(src + base + 32 + blk, mask=mask, other=0).to(tl.int32) >> (4 * g)
        idx = tl.load(src + base + e // 8, mask=mask, other=0).to(tl.int32) | ((qh & 7) << 8)
        delta = tl.where((qh & 8) != 0, -0.125, 0.125)
        gv = tl.load(aux + idx * 8 + e % 8, mask=mask, other=0.0)
        return dl * (gv + delta)
