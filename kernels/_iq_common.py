"""Search steps shared by the lattice i-quants (IQ1_S/M, IQ2_XXS/XS/S, IQ3_XXS/S), vectorized over blocks.

The IQ2/IQ3 types quantize a block of 16 or 32 weights as ``scale * sign * (2 * level + 1)`` with the levels of each
group of 8 (IQ2) or 4 (IQ3) weights forming a point of a fixed lattice (:mod:`._iq_grids`). ggml's quantizers
(``quantize_row_iq2_xxs_impl``, ``..._iq2_xs_impl``, ``..._iq2_s_impl``, ``..._iq3_xxs_impl``, ``..._iq3_s_impl``)
share the steps below; each codec strings them together in its own order (the IQ1 types have their own split search
in :mod:`.iq1_s` and use :func:`rowsum`, :func:`importance` and the packing helpers). As in :mod:`._search`,
everything is float32 in ggml's operation order, sums over a block are left-to-right (:func:`rowsum`),
``nearest_int`` is ``torch.round``, and a candidate replaces the running best only when strictly better.

Layout: blocks are rows, ``(B, n)`` float32; per-block scalars are ``(B,)``.

On CUDA three steps run as Triton kernels with the same float32 operations in the same order (so the same bytes):
:func:`rowsum` (one program walks its rows left to right), the neighbour search of :func:`snap`
(:func:`nearest_triton`: each group walks its own neighbour list in order, instead of a padded gather of every
list, and the snap needs no host synchronization) and the coordinate descent of :func:`qp_scale`
(:func:`descent_triton`: 5 x 32 sequential moves per block in registers instead of ~2,700 small PyTorch ops).
A 64M-weight IQ2_XXS chunk is then about a thousand PyTorch ops and a few dozen kernel launches, none waiting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._iq_grids import SearchTables, dequant_grid, ksigns
from ._legacy_common import quantize_rows
from ._search import seqsum, sqrt_f32
from ._triton import HAVE_TRITON, tl, triton


def on_gpu(t: torch.Tensor) -> bool:
    """Whether the Triton kernels of this module run for ``t`` (a CUDA tensor with Triton installed)."""
    return t.is_cuda and HAVE_TRITON


def rowsum(t: torch.Tensor) -> torch.Tensor:
    """Left-to-right float32 sum of each row of ``(B, n)`` (``((0 + t0) + t1) + ...``)."""
    if on_gpu(t) and t.dtype == torch.float32:
        return rowsum_triton(t)
    return seqsum(t.t().contiguous(), scratch=True)


ROWSUM_BLOCK = 128
NEAREST_BLOCK = 128


def rowsum_triton(t: torch.Tensor) -> torch.Tensor:
    """:func:`rowsum` of float32 rows as one Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``), the same
    sums."""
    t = t.contiguous()
    B, n = t.shape
    out = torch.empty(B, dtype=torch.float32, device=t.device)
    if B:
        _rowsum_kernel[(triton.cdiv(B, ROWSUM_BLOCK),)](t, out, B, N=n, BLOCK=ROWSUM_BLOCK, num_warps=4)
    return out


def nearest_triton(t: SearchTables, key: torch.Tensor, xval: torch.Tensor, waux: torch.Tensor,
                   scale: torch.Tensor) -> torch.Tensor:
    """For every group whose key ``(B, n/dim)`` is off the lattice, the neighbour of least
    ``Σ waux * (scale * q - x)²`` (summed over the group's coordinates left to right, the first on ties), as the
    PyTorch branch of :func:`snap` chooses it; groups on the lattice get -1. One Triton kernel."""
    B, groups = key.shape
    row = t.row[key].reshape(-1).contiguous()
    count = (t.neighbours >= 0).sum(dim=1)
    out = torch.full((B * groups,), -1, dtype=torch.int64, device=key.device)
    G = B * groups
    if G:
        _nearest_kernel[(triton.cdiv(G, NEAREST_BLOCK),)](
            xval.contiguous(), waux.contiguous(), scale.to(torch.float32).contiguous(), row, t.neighbours, count,
            t.coords, out, G, groups, t.neighbours.shape[1], DIM=t.dim, BLOCK=NEAREST_BLOCK, num_warps=4,
            enable_fp_fusion=False)
    return out.reshape(B, groups)


def importance(xb: torch.Tensor, qwb: torch.Tensor | None, sigma_scale: float) -> torch.Tensor:
    """Per-weight importances of super-blocks ``xb`` ``(nbl, 256)``: ``qw * sqrt(sigma2 + x^2)`` with
    ``sigma2 = sigma_scale * Σx² / 256`` (the sum left to right), or ``x^2`` without an imatrix."""
    x2 = xb * xb
    if qwb is None:
        return x2
    sumx2 = rowsum(x2)
    sigma2 = (sumx2 * sigma_scale if sigma_scale != 1.0 else sumx2) / torch.full_like(sumx2, float(xb.shape[1]))
    return qwb * sqrt_f32(x2 + sigma2[:, None])


def fold_signs(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's sign handling per group of 8: ``xval = |x|`` and the 7 stored sign bits per group ``(B, n/8)``.

    The 8th sign is implied (an even count of minus signs), so a group with an odd count flips the weight of least
    ``w * x * x`` (the first on ties) back to its negative value and stores its sign as +.
    """
    B, n = x.shape
    neg = ~(x >= 0)
    xval = torch.where(neg, -x, x).reshape(B, n // 8, 8)
    g = neg.reshape(B, n // 8, 8).to(torch.int64)
    s = (g << torch.arange(8, device=x.device)).sum(dim=2)
    odd = (g.sum(dim=2) % 2) == 1
    imin = ((w * x) * x).reshape(B, n // 8, 8).argmin(dim=2)
    hit = torch.nn.functional.one_hot(imin, 8).bool() & odd[:, :, None]
    xval = torch.where(hit, -xval, xval).reshape(B, n)
    s = torch.where(odd, s ^ torch.bitwise_left_shift(torch.ones_like(imin), imin), s)
    return xval, s & 127


def qp_scale(x: torch.Tensor, nmax: int, w: torch.Tensor) -> torch.Tensor:
    """ggml ``make_qp_quants(n, nmax, x, (uint8_t *) L, w)`` on rows ``(B, n)``: the returned scale.

    The codes live in a ``uint8_t`` array, so a negative code (``x`` may hold one negative value after
    :func:`fold_signs`) is stored as ``code + 256``; the first error estimate and the coordinate descent read the
    stored value while the sums start from the signed codes, exactly as the C code does.
    """
    mx = x.amax(dim=1).clamp(min=0.0)
    zero = mx < 1e-15
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = torch.full_like(mx, float(nmax)) / mx
    stored = torch.round(x * iscale[:, None]).remainder(256.0)
    scale = torch.full_like(iscale, 1.0) / iscale
    d = x - scale[:, None] * stored
    best = rowsum((w * d) * d)
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        c = torch.tensor(k, dtype=torch.float32) * torch.tensor(0.1, dtype=torch.float32) + float(nmax)
        isc = torch.full_like(mx, float(c)) / mx
        sc = torch.full_like(mx, 1.0) / isc
        lv = torch.round(x * isc[:, None]).clamp(max=nmax)
        d = x - sc[:, None] * lv
        mse = rowsum((w * d) * d)
        acc = mse < best
        best = torch.where(acc, mse, best)
        iscale = torch.where(acc, isc, iscale)
    lv = torch.round(x * iscale[:, None]).clamp(max=nmax)
    wx = w * x
    sumlx = rowsum(wx * lv)
    suml2 = rowsum((w * lv) * lv)
    L = lv.remainder(256.0)
    if on_gpu(x):
        sumlx, suml2 = descent_triton(x, w, L, sumlx, suml2, nmax)
    else:
        sumlx, suml2 = _descent(x, w, wx, L, sumlx, suml2, nmax)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), 0.0)
    return scale.masked_fill_(zero, 0.0)


def _descent(x: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, L: torch.Tensor, sumlx: torch.Tensor,
             suml2: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The five coordinate-descent sweeps of ``make_qp_quants`` over stored codes ``L`` (updated in place):
    a position moves to ``nearest(x * Σ'wl² / Σ'wxl)`` when that raises ``(Σwxl)² / Σwl²``. Returns the final
    ``(Σwxl, Σwl²)``."""
    for _ in range(5):
        for i in range(x.shape[1]):
            li = L[:, i]
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - (w[:, i] * li) * li
            ok = (slx > 0) & (sl2 > 0)
            new = torch.round(x[:, i] * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp(max=nmax)
            ok &= new != li
            slx = slx + wx[:, i] * new
            sl2 = sl2 + (w[:, i] * new) * new
            ok &= (slx * slx) * suml2 > (sumlx * sumlx) * sl2
            L[:, i] = torch.where(ok, new.remainder(256.0), li)
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
    return sumlx, suml2


DESCENT_BLOCK = 32


def descent_triton(x: torch.Tensor, w: torch.Tensor, L: torch.Tensor, sumlx: torch.Tensor, suml2: torch.Tensor,
                   nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_descent` as one Triton kernel (each program holds its blocks' codes in registers), the same sums.
    ``L`` is read, not updated."""
    B, n = x.shape
    slx = sumlx.to(torch.float32).contiguous().clone()
    sl2 = suml2.to(torch.float32).contiguous().clone()
    if B:
        _descent_kernel[(triton.cdiv(B, DESCENT_BLOCK),)](
            x.contiguous(), w.contiguous(), L.contiguous(), slx, sl2, B, NMAX=float(nmax), N=n, BLOCK=DESCENT_BLOCK,
            num_warps=4, enable_fp_fusion=False)
    return slx, sl2


def snap(
    t: SearchTables, xval: torch.Tensor, waux: torch.Tensor, inv: torch.Tensor, scale: torch.Tensor, kmax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round ``xval`` ``(B, n)`` to levels ``nearest(0.5 * (inv * x - 1))`` clamped to ``0..kmax-1`` and move every
    group that is not a lattice point to its best neighbour (least ``Σ waux * (scale * q - x)²``, first on ties;
    ggml's ``iq2_find_best_neighbour`` / ``iq3_find_best_neighbour``).

    ``inv``, ``scale``: ``(B,)``, finite. Returns the coordinates ``q = 2 * level + 1`` (float32 ``(B, n)``), the
    point index per group ``(B, n/dim)`` and whether the rounded group was already a point ``(B, n/dim)``.
    """
    B, n = xval.shape
    dim = t.dim
    lv = torch.round((inv[:, None] * xval - 1.0) * 0.5).clamp_(0, kmax - 1).to(torch.int64).reshape(B, n // dim, dim)
    key = (lv << (t.bits * torch.arange(dim, device=xval.device))).sum(dim=2)
    idx = t.map[key]
    on = idx >= 0
    off = ~on
    if on_gpu(xval):
        idx = torch.where(on, idx, nearest_triton(t, key, xval, waux, scale))
    elif bool(off.any()):
        nb = t.neighbours[t.row[key[off]]]
        q = t.coords[nb.clamp(min=0)]
        xv = xval.reshape(B, n // dim, dim)[off]
        wv = waux.reshape(B, n // dim, dim)[off]
        sc = scale[:, None].expand(B, n // dim)[off]
        diff = sc[:, None, None] * q - xv[:, None, :]
        terms = (wv[:, None, :] * diff) * diff
        d2 = terms[:, :, 0] + 0.0
        for i in range(1, dim):
            d2 = d2 + terms[:, :, i]
        d2 = torch.where(nb >= 0, d2, torch.inf)
        idx = idx.masked_scatter(off, nb.gather(1, d2.argmin(dim=1, keepdim=True)).squeeze(1))
    return t.coords[idx].reshape(B, n), idx, on


def lsq(w: torch.Tensor, xval: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ w * x * q, Σ w * q * q)`` per row, left to right."""
    return rowsum((w * xval) * q), rowsum((w * q) * q)


def safe_inv(v: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``1 / v`` where ``ok``, else 1 (keeps masked-off blocks finite through the searches)."""
    return torch.full_like(v, 1.0) / torch.where(ok, v, torch.ones_like(v))


def block_scale_codes(scales: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """4-bit block scales ``clamp(nearest(0.5 * (scale / d - 1)), 0, 15)`` from ``scales`` ``(nbl, k)`` and the
    unrounded super-block ``d`` ``(nbl,)`` (0 where ``d`` is 0); int64."""
    inv = torch.where(d != 0, torch.full_like(d, 1.0) / torch.where(d != 0, d, torch.ones_like(d)), 0.0)
    return torch.round((inv[:, None] * scales - 1.0) * 0.5).clamp_(0, 15).to(torch.int64)


def le_bytes(words: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Little-endian bytes of non-negative int64 ``words`` ``(..., k)`` -> uint8 ``(..., k * nbytes)``."""
    shifts = 8 * torch.arange(nbytes, device=words.device)
    return ((words[..., None] >> shifts) & 255).to(torch.uint8).reshape(*words.shape[:-1], -1)


def _ratio(num: torch.Tensor, den: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    return num / torch.where(ok, den, torch.ones_like(den))


def trial_search(
    t: SearchTables,
    xval: torch.Tensor,
    w: torch.Tensor,
    waux: torch.Tensor,
    live: torch.Tensor,
    mx: torch.Tensor,
    top: int,
    step: float,
    n_trials: int,
    kmax: int,
    resnap_all: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale search of ``quantize_row_iq2_xs_impl`` / ``quantize_row_iq3_xxs_impl`` on blocks ``(B, n)``.

    Start from ``scale = max / top`` and all-zero levels; try the grids ``(top + k * step) / max`` for
    ``k = -n_trials..n_trials``, each snapped to the lattice (:func:`snap`), keeping the strictly best
    ``(Σwxq)² / Σwq²`` with its least-squares scale; then re-snap the groups the best trial had moved off the
    lattice at that scale and refit the scale. ``live`` masks blocks ggml skips (``max < eps``); ``mx`` is their
    largest ``xval``. Returns ``(scale (B,), q (B, n))`` with ``q = 2 * level + 1``.

    ``resnap_all`` is ``quantize_row_iq3_s_impl``'s variant: groups start as "off the lattice" (so a block where
    no trial is accepted is re-snapped), and the final re-snap moves every group, not only the ones off.
    """
    B, n = xval.shape
    mx = torch.where(live, mx, torch.ones_like(mx))
    scale = mx / torch.full_like(mx, float(top))
    best = torch.zeros_like(scale)
    q = torch.ones_like(xval)
    on = torch.full((B, n // t.dim), not resnap_all, dtype=torch.bool, device=xval.device)
    stp = torch.tensor(step, dtype=torch.float32)
    for k in range(-n_trials, n_trials + 1):
        c = float(torch.tensor(float(k), dtype=torch.float32) * stp + float(top))
        inv = torch.full_like(mx, c) / mx
        qa, _, oa = snap(t, xval, waux, inv, torch.full_like(inv, 1.0) / inv, kmax)
        sumqx, sumq2 = lsq(w, xval, qa)
        acc = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = torch.where(acc, _ratio(sumqx, sumq2, acc), scale)
        best = torch.where(acc, scale * sumqx, best)
        q = torch.where(acc[:, None], qa, q)
        on = torch.where(acc[:, None], oa, on)
    fix = live & (~on).any(dim=1) & (scale > 0)
    if bool(fix.any()):
        sc = torch.where(fix, scale, torch.ones_like(scale))
        qf = snap(t, xval, waux, safe_inv(sc, fix), sc, kmax)[0]
        redo = (fix[:, None] & (~on | resnap_all)).repeat_interleave(t.dim, dim=1)
        q = torch.where(redo, qf, q)
        sumqx, sumq2 = lsq(w, xval, q)
        upd = fix & (sumq2 > 0)
        scale = torch.where(upd, _ratio(sumqx, sumq2, upd), scale)
    return scale, q


def lattice_indices(t: SearchTables, q: torch.Tensor) -> torch.Tensor:
    """Lattice index per group from coordinates ``q`` ``(B, n)`` whose groups are all lattice points:
    ``(B, n / dim)`` int64."""
    lv = ((q - 1.0) * 0.5).to(torch.int64).reshape(q.shape[0], -1, t.dim)
    return t.map[(lv << (t.bits * torch.arange(t.dim, device=q.device))).sum(dim=2)]


def sign_bits(signs: torch.Tensor) -> torch.Tensor:
    """Stored 7-bit sign fields ``(...)`` -> per-weight negative flags ``(..., 8)`` (ggml ``ksigns_iq2xs``)."""
    full = ksigns(signs.device)[signs]
    return ((full[..., None] >> torch.arange(8, device=signs.device)) & 1).bool()


def quantize_lattice(
    weight: torch.Tensor, imatrix: torch.Tensor | None, name: str, type_size: int, tables: SearchTables, encode
) -> torch.Tensor:
    """The codec ``quantize`` of a lattice i-quant: validated rows through the C kernels of :mod:`._cpu_fast` on
    CPU (same bytes; unless ``QUANTFORGE_CPU_KERNELS=torch``), else through the PyTorch ``encode(x, qw, out)``."""
    from . import _cpu_fast

    if _cpu_fast.iq_enabled(weight):
        return quantize_rows(weight, imatrix, 256, type_size,
                             lambda x, qw, out: _cpu_fast.encode_iq(name, tables, x, qw, out), path="c")
    return quantize_rows(weight, imatrix, 256, type_size, encode)


def tile_aux(lattice: str, device: torch.device | str) -> torch.Tensor:
    """The float32 side table the Triton tiles of a lattice i-quant read: its dequantization grid, flattened
    (point ``i``, coordinate ``j`` at ``i * dim + j``)."""
    return dequant_grid(lattice, device).reshape(-1).contiguous()



def codec_entry_points(fmt: Any, lattice: str) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """``(tile_aux, dequantize_triton)`` of a lattice i-quant codec module: the side table its Triton tile reads
    through ``aux`` (the lattice's dequantization grid), and the Triton dequantize through :mod:`.tiles`, the same
    result as the codec's PyTorch ``dequantize``."""

    def codec_tile_aux(device: torch.device | str) -> torch.Tensor:
        return tile_aux(lattice, device)

    def dequantize_triton(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from . import tiles

        return tiles.dequantize(fmt, data, dtype, aux=tile_aux(lattice, data.device))

    return codec_tile_aux, dequantize_triton

if HAVE_TRITON:

    @triton.jit
    def _rowsum_kernel(x_ptr, out_ptr, B, N: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = r < B
        base = x_ptr + r.to(tl.int64) * N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(N):
            acc = acc + tl.load(base + i, mask=ok, other=0.0)
        tl.store(out_ptr + r, acc, mask=ok)

    @triton.jit
    def _round_even(v):
        """Round half to even for any finite float32 (``torch.round``); every step is exact."""
        r = tl.floor(v)
        f = v - r
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return r + tl.where((f > 0.5) | ((f == 0.5) & odd), 1.0, 0.0)

    @triton.jit
    def _descent_kernel(x_ptr, w_ptr, L_ptr, slx_ptr, sl2_ptr, B, NMAX: tl.constexpr, N: tl.constexpr,
                        BLOCK: tl.constexpr):
        b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        j = tl.arange(0, N)
        ok_b = b < B
        row = b.to(tl.int64) * N
        L = tl.load(L_ptr + row[:, None] + j[None, :], mask=ok_b[:, None] & (j[None, :] < N), other=0.0)
        sumlx = tl.load(slx_ptr + b, mask=ok_b, other=0.0)
        suml2 = tl.load(sl2_ptr + b, mask=ok_b, other=0.0)
        for _ in range(5):
            for i in range(N):
                xi = tl.load(x_ptr + row + i, mask=ok_b, other=0.0)
                wi = tl.load(w_ptr + row + i, mask=ok_b, other=0.0)
                wxi = wi * xi
                at = j[None, :] == i
                li = tl.sum(tl.where(at, L, 0.0), axis=1)
                slx = sumlx - wxi * li
                sl2 = suml2 - (wi * li) * li
                ok = (slx > 0) & (sl2 > 0)
                new = tl.minimum(_round_even(tl.math.div_rn(xi * sl2, tl.where(ok, slx, 1.0))), NMAX)
                ok = ok & (new != li)
                slx = slx + wxi * new
                sl2 = sl2 + (wi * new) * new
                ok = ok & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
                stored = new - 256.0 * tl.floor(new * 0.00390625)
                L = tl.where(at & ok[:, None], stored[:, None], L)
                sumlx = tl.where(ok, slx, sumlx)
                suml2 = tl.where(ok, sl2, suml2)
        tl.store(slx_ptr + b, sumlx, mask=ok_b)
        tl.store(sl2_ptr + b, suml2, mask=ok_b)

    @triton.jit
    def _nearest_kernel(x_ptr, w_ptr, sc_ptr, row_ptr, nb_ptr, cnt_ptr, coords_ptr, out_ptr, G, GPB, K,
                        DIM: tl.constexpr, BLOCK: tl.constexpr):
        g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        row = tl.load(row_ptr + g, mask=g < G, other=-1)
        off = (g < G) & (row >= 0)
        row = tl.where(off, row, 0)
        n = tl.load(cnt_ptr + row, mask=off, other=0)
        sc = tl.load(sc_ptr + g // GPB, mask=off, other=0.0)
        xb = x_ptr + g.to(tl.int64) * DIM
        wb = w_ptr + g.to(tl.int64) * DIM
        best = tl.zeros([BLOCK], dtype=tl.float32)
        arg = tl.zeros([BLOCK], dtype=tl.int64)
        for k in range(0, tl.max(n, axis=0)):
            valid = off & (k < n)
            p = tl.load(nb_ptr + row * K + k, mask=valid, other=0)
            d2 = tl.zeros([BLOCK], dtype=tl.float32)
            for d in tl.static_range(DIM):
                # the group's own values do not depend on k (loop-invariant loads, hoisted by the compiler)
                diff = sc * tl.load(coords_ptr + p * DIM + d, mask=valid, other=0.0) - tl.load(xb + d, mask=off,
                                                                                                 other=0.0)
                d2 = d2 + (tl.load(wb + d, mask=off, other=0.0) * diff) * diff
            better = valid & ((d2 < best) | (k == 0))
            best = tl.where(better, d2, best)
            arg = tl.where(better, p, arg)
        tl.store(out_ptr + g, arg, mask=off)

    @triton.jit
    def u32_at(src, off, mask):
        """Little-endian u32 at byte offsets ``off`` -> int64."""
        v = tl.load(src + off, mask=mask, other=0).to(tl.int64)
        v |= tl.load(src + off + 1, mask=mask, other=0).to(tl.int64) << 8
        v |= tl.load(src + off + 2, mask=mask, other=0).to(tl.int64) << 16
        v |= tl.load(src + off + 3, mask=mask, other=0).to(tl.int64) << 24
        return v

    @triton.jit
    def signed(y, sign7, jj):
        """``y`` negated where bit ``jj`` (0..7) of ggml's ``ksigns_iq2xs[sign7]`` is set (bit 7 = parity)."""
        p = sign7 ^ (sign7 >> 4)
        p ^= p >> 2
        p ^= p >> 1
        bit = tl.where(jj < 7, (sign7 >> jj) & 1, p & 1)
        return tl.where(bit != 0, -y, y)
