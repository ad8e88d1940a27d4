"""Fast CPU quantizers: numba-compiled loops that give the same bytes as the PyTorch reference codecs.

The reference codecs (``q*.py``, ``iq4_*.py``, built on :mod:`._search`) run every search as a chain of PyTorch ops
over all groups at once. Here the same searches are compiled loops: per chunk of groups (sub-blocks or blocks),
the data is laid out position-major ``(n, G)`` like the reference's transposed layout, and every loop runs over
the ``G`` groups innermost, so each group's float32 sums stay strictly sequential (``((0 + t0) + t1) + ...``, as in
ggml's C loops) while LLVM vectorizes across groups. Decisions are the reference's, op for op:

- float32 arithmetic throughout, in the reference's operation order (no fast-math: no FMA contraction, no
  reassociation); ``nearest_int`` is ``(v + 1.5*2^23) - 1.5*2^23`` (round half to even, exact for |v| < 2^22 and
  clamped afterwards everywhere it matters); divisions are real divisions where the reference divides;
- candidates replace the running best only when strictly better, in the reference's order;
- fp16 conversion is round-to-nearest-even on the bit pattern (:func:`_f16_bits`), and ``d``/``dmin`` are rounded
  through fp16 before the re-quantization pass.

:func:`quantize` is the entry point; the codecs' ``quantize`` functions call it for CPU tensors unless
``QUANTFORGE_CPU_KERNELS=torch`` (or numba is missing), so the PyTorch code stays the reference (and the CUDA path).
Rows are split over ``torch.get_num_threads()`` worker threads (the compiled loops release the GIL).

The bytes equal the reference's wherever the searches' float32 sums stay finite (weights up to ~1e11, and any
small magnitude down to subnormals). Beyond ~1e12 some sums overflow to inf/NaN; the reference and llama.cpp
already disagree there, and these kernels then mostly follow llama.cpp and never index out of range.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import InputError

try:  # numba is a project dependency; without it the reference PyTorch path is used
    from numba import njit

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

ENV = "QUANTFORGE_CPU_KERNELS"
"""``torch`` selects the PyTorch reference on CPU; anything else (default ``jit``) the compiled path."""

TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs")


def enabled(weight: torch.Tensor) -> bool:
    """Whether the compiled path quantizes ``weight`` (a CPU tensor, numba importable, not switched off)."""
    return HAVE_NUMBA and weight.device.type == "cpu" and os.environ.get(ENV, "jit").lower() != "torch"


def _jit(fn):
    """Compile ``fn`` lazily on first call, cached on disk (``__pycache__`` beside this file, or
    ``NUMBA_CACHE_DIR``), releasing the GIL; float division by zero gives inf/nan as in C (``error_model``).
    No ``fastmath``: LLVM then neither contracts ``a*b + c`` into an FMA nor reorders sums."""
    return njit(nogil=True, cache=True, error_model="numpy")(fn) if HAVE_NUMBA else fn


F = np.float32
_ZERO = F(0.0)
_ONE = F(1.0)
_TWO = F(2.0)
_HALF = F(0.5)
_MAGIC = F(12582912.0)
_EPS = F(1e-15)
_TENTH = F(0.1)
_2P24 = F(16777216.0)
_2M24 = F(1.0 / 16777216.0)
_FMAX = F(np.finfo(np.float32).max)
_I = np.int64  # jitted callees get int64 / bool arguments, not literals (one compiled version each)
_B = np.bool_
_KV = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def _iq4_tables() -> tuple[np.ndarray, np.ndarray]:
    """Index (uint8) and value (float32) of the nearest IQ4 grid value for cell ``floor(2a) + 256`` (see
    :mod:`._iq4_common`: every midpoint is a multiple of 1/2, exact ties go to the upper index)."""
    grid = _KV.astype(np.float64)
    mids = (grid[1:] + grid[:-1]) / 2
    lows = (np.arange(512, dtype=np.float64) - 256) / 2
    idx = (lows[:, None] >= mids[None, :]).sum(axis=1)
    return idx.astype(np.uint8), grid[idx].astype(np.float32)


_IQ4_IDX, _IQ4_VAL = _iq4_tables()


# ----------------------------------------------------------------------------------------------- scalar helpers


@_jit
def _nearest(v):
    """ggml ``nearest_int`` as a float32: round half to even for |v| < 2^22 (larger values stay large)."""
    return (v + _MAGIC) - _MAGIC


@_jit
def _clamp(v, lo, hi):
    v = lo if v < lo else v
    return hi if v > hi else v


@_jit
def _f16_bits(f):
    """float32 -> IEEE fp16 bit pattern, round to nearest even (``torch.half()``, ``GGML_FP32_TO_FP16``)."""
    x = np.int64(np.float32(f).view(np.uint32))
    sign = (x >> 16) & 0x8000
    a = x & 0x7FFFFFFF
    if a >= 0x7F800000:  # inf / nan
        return sign | 0x7C00 | (0x200 if a > 0x7F800000 else 0)
    if a < 0x38800000:  # below the smallest normal fp16: multiples of 2^-24 (1024 is the smallest normal)
        m = np.int64(_nearest(abs(f) * _2P24))
        return sign | m
    e = (a >> 23) - 112
    h = (e << 10) | ((a >> 13) & 0x3FF)
    rem = a & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
        h += 1
    if h > 0x7C00:
        h = 0x7C00
    return sign | h


@_jit
def _f16_value(h):
    """IEEE fp16 bit pattern -> float32."""
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.float32(m) * _2M24
        return -v if sign else v
    if e == 31:
        bits = sign | 0x7F800000 | (m << 13)
    else:
        bits = sign | ((e + 112) << 23) | (m << 13)
    return np.uint32(bits).view(np.float32)


@_jit
def _f16_round(f):
    return _f16_value(_f16_bits(f))


@_jit
def _put_f16(out, pos, f):
    h = _f16_bits(f)
    out[pos] = h & 255
    out[pos + 1] = (h >> 8) & 255


@_jit
def _iq4_cell(a):
    """Table cell of ``floor(a)`` for ``a`` = twice the scaled weight, clamped to [-256, 255], plus 256.

    NaN (from float overflow in the scale search of weights beyond ~1e12) takes the top cell, the index that
    ggml's ``best_index_int8`` ends on when every comparison is false (and never an out-of-range index)."""
    if np.isnan(a):
        return 511
    a = _clamp(a, F(-256.0), F(255.0))
    t = np.int64(a)
    if np.float32(t) > a:
        t -= 1
    return t + 256


# ------------------------------------------------------------------------------- searches on (n, G) groups
# ``xt``/``wt``: float32 (n, >= G); group g is column g. Outputs are written to the first G columns / entries.


@_jit
def _signed_absmax_lanes(xt, G, out):
    """Per group, the value of largest magnitude with its sign (first one on ties, C's ``>`` loop from 0)."""
    n = xt.shape[0]
    amax = np.zeros(G, np.float32)
    for g in range(G):
        out[g] = _ZERO
    for i in range(n):
        xi = xt[i]
        for g in range(G):
            v = xi[g]
            a = abs(v)
            take = a > amax[g]
            amax[g] = a if take else amax[g]
            out[g] = v if take else out[g]


@_jit
def _qkx_lanes(xt, wt, G, nmax, rmin, rdelta, nstep, use_mad, strict_flat, L, scale_out, min_out):
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (``_search.qkx_search_t``): codes ``L`` (float, 0..nmax),
    ``scale_out`` and ``min_out`` (= the_min >= 0) for each group."""
    n = xt.shape[0]
    fmax = np.float32(nmax)
    mn = np.empty(G, np.float32)
    mx = np.empty(G, np.float32)
    sum_w = np.zeros(G, np.float32)
    sum_x = np.zeros(G, np.float32)
    best = np.zeros(G, np.float32)
    scale = np.empty(G, np.float32)
    best_isc = np.empty(G, np.float32)
    best_base = np.empty(G, np.float32)
    cur_min = np.empty(G, np.float32)
    isc = np.empty(G, np.float32)
    s_l = np.empty(G, np.float32)
    s_l2 = np.empty(G, np.float32)
    s_xl = np.empty(G, np.float32)
    t_scale = np.empty(G, np.float32)
    t_min = np.empty(G, np.float32)
    cur = np.empty(G, np.float32)
    flat = np.empty(G, np.bool_)
    x0 = xt[0]
    for g in range(G):
        mn[g] = x0[g]
        mx[g] = x0[g]
    for i in range(n):
        xi = xt[i]
        wi = wt[i]
        for g in range(G):
            v = xi[g]
            m0 = mn[g]
            m1 = mx[g]
            mn[g] = v if v < m0 else m0
            mx[g] = v if v > m1 else m1
            sum_w[g] += wi[g]
            sum_x[g] += wi[g] * v
    for g in range(G):
        m0 = mn[g]
        m0 = _ZERO if m0 > _ZERO else m0
        mn[g] = m0
        fl = (mx[g] == m0) if strict_flat else (mx[g] <= m0)
        flat[g] = fl
        rng = _ONE if fl else mx[g] - m0
        iscale = fmax / rng
        isc[g] = iscale
        scale[g] = _ONE / iscale
        best_isc[g] = iscale
        best_base[g] = m0
        cur_min[g] = m0
    for i in range(n):
        xi = xt[i]
        wi = wt[i]
        for g in range(G):
            v = xi[g]
            lv = _clamp(_nearest((v - mn[g]) * isc[g]), _ZERO, fmax)
            d = (lv * scale[g] + mn[g]) - v
            d = abs(d) if use_mad else d * d
            best[g] += d * wi[g]
    Laux = L
    for k in range(nstep + 1):
        c = (rmin + rdelta * np.float32(k)) + fmax
        for g in range(G):
            isc[g] = c / (mx[g] - cur_min[g])
            s_l[g] = _ZERO
            s_l2[g] = _ZERO
            s_xl[g] = _ZERO
            cur[g] = _ZERO
        for i in range(n):
            xi = xt[i]
            wi = wt[i]
            li = Laux[i]
            for g in range(G):
                v = xi[g]
                lv = _clamp(_nearest((v - cur_min[g]) * isc[g]), _ZERO, fmax)
                li[g] = lv
                a = wi[g] * lv
                s_l[g] += a
                s_l2[g] += a * lv
                s_xl[g] += a * v
        for g in range(G):
            D = sum_w[g] * s_l2[g] - s_l[g] * s_l[g]
            ts = (sum_w[g] * s_xl[g] - sum_x[g] * s_l[g]) / D
            tm = (s_l2[g] * sum_x[g] - s_l[g] * s_xl[g]) / D
            over = tm > _ZERO
            t_min[g] = _ZERO if over else tm
            t_scale[g] = s_xl[g] / s_l2[g] if over else ts
            s_l[g] = D
        for i in range(n):
            xi = xt[i]
            wi = wt[i]
            li = Laux[i]
            for g in range(G):
                d = (li[g] * t_scale[g] + t_min[g]) - xi[g]
                d = abs(d) if use_mad else d * d
                cur[g] += d * wi[g]
        for g in range(G):
            acc = s_l[g] > _ZERO and cur[g] < best[g]
            best[g] = cur[g] if acc else best[g]
            scale[g] = t_scale[g] if acc else scale[g]
            best_isc[g] = isc[g] if acc else best_isc[g]
            best_base[g] = cur_min[g] if acc else best_base[g]
            cur_min[g] = t_min[g] if acc else cur_min[g]
    for i in range(n):
        xi = xt[i]
        li = L[i]
        for g in range(G):
            lv = _clamp(_nearest((xi[g] - best_base[g]) * best_isc[g]), _ZERO, fmax)
            li[g] = _ZERO if flat[g] else lv
    for g in range(G):
        scale_out[g] = _ZERO if flat[g] else scale[g]
        min_out[g] = -(mn[g] if flat[g] else cur_min[g])


@_jit
def _qx_lanes(xt, wt, has_w, G, nmax, L, scale_out):
    """``make_qx_quants`` (``rmse_type=1``; ``_search.qx_search_t``): codes ``L`` (float, 0..2*nmax-1) and scales.
    Weights ``wt`` where ``has_w``, else ``x²``."""
    n = xt.shape[0]
    fmax = np.float32(nmax)
    lo = -fmax
    hi = fmax - _ONE
    mx = np.empty(G, np.float32)
    _signed_absmax_lanes(xt, G, mx)
    zero = np.empty(G, np.bool_)
    for g in range(G):
        z = abs(mx[g]) < _EPS
        zero[g] = z
        mx[g] = _ONE if z else mx[g]
    w = np.empty((n, G), np.float32)
    wx = np.empty((n, G), np.float32)
    for i in range(n):
        xi = xt[i]
        wi = w[i]
        wxi = wx[i]
        src = wt[i]
        for g in range(G):
            v = xi[g]
            ww = src[g] if has_w else v * v
            wi[g] = ww
            wxi[g] = ww * v
    scale = np.empty(G, np.float32)
    best = np.empty(G, np.float32)
    best_isc = np.empty(G, np.float32)
    isc = np.empty(G, np.float32)
    slx = np.empty(G, np.float32)
    sl2 = np.empty(G, np.float32)
    for k in range(19):
        if k == 0:
            c = fmax
        else:
            kk = k - 10 if k <= 9 else k - 9
            c = fmax + _TENTH * np.float32(kk)
        for g in range(G):
            isc[g] = (-c) / mx[g]
            slx[g] = _ZERO
            sl2[g] = _ZERO
        for i in range(n):
            xi = xt[i]
            wi = w[i]
            wxi = wx[i]
            for g in range(G):
                lv = _clamp(_nearest(xi[g] * isc[g]), lo, hi)
                slx[g] += wxi[g] * lv
                sl2[g] += (wi[g] * lv) * lv
        if k == 0:
            for g in range(G):
                s = slx[g] / sl2[g] if sl2[g] != _ZERO else _ZERO
                scale[g] = s
                best[g] = s * slx[g]
                best_isc[g] = isc[g]
        else:
            for g in range(G):
                acc = sl2[g] > _ZERO and slx[g] * slx[g] > best[g] * sl2[g]
                s = slx[g] / sl2[g]
                scale[g] = s if acc else scale[g]
                best[g] = s * slx[g] if acc else best[g]
                best_isc[g] = isc[g] if acc else best_isc[g]
    for i in range(n):
        xi = xt[i]
        li = L[i]
        for g in range(G):
            lv = _clamp(_nearest(xi[g] * best_isc[g]), lo, hi) + fmax
            li[g] = _ZERO if zero[g] else lv
    for g in range(G):
        scale_out[g] = _ZERO if zero[g] else scale[g]


@_jit
def _descent_lanes(xt, w, L, G, lo, hi, qp, sums):
    """Up to 5 passes of the coordinate descent of ``make_qp_quants`` (``qp``) / ``make_q3_quants`` on codes ``L``
    (float, in place). ``sums`` (2, G) receives the final Σwxl and Σwl²."""
    n = xt.shape[0]
    sumlx = sums[0]
    suml2 = sums[1]
    wx = np.empty((n, G), np.float32)
    for g in range(G):
        sumlx[g] = _ZERO
        suml2[g] = _ZERO
    for i in range(n):
        xi = xt[i]
        wi = w[i]
        li = L[i]
        wxi = wx[i]
        for g in range(G):
            a = wi[g] * xi[g]
            wxi[g] = a
            sumlx[g] += a * li[g]
            suml2[g] += (wi[g] * li[g]) * li[g]
    for _ in range(5):
        changed = 0
        for i in range(n):
            xi = xt[i]
            wi = w[i]
            li = L[i]
            wxi = wx[i]
            for g in range(G):
                l0 = li[g]
                slx = sumlx[g] - wxi[g] * l0
                sl2 = suml2[g] - (wi[g] * l0) * l0
                ok = slx > _ZERO
                if qp:
                    ok = ok and sl2 > _ZERO
                new = _nearest((xi[g] * sl2) / slx)
                new = hi if new > hi else new
                if not qp:
                    new = lo if new < lo else new
                ok = ok and new != l0
                slx = slx + wxi[g] * new
                sl2 = sl2 + (wi[g] * new) * new
                if not qp:
                    ok = ok and sl2 > _ZERO
                ok = ok and (slx * slx) * suml2[g] > (sumlx[g] * sumlx[g]) * sl2
                li[g] = new if ok else l0
                sumlx[g] = slx if ok else sumlx[g]
                suml2[g] = sl2 if ok else suml2[g]
                changed += 1 if ok else 0
        if changed == 0:
            break


@_jit
def _qp_lanes(xt, wt, G, nmax, L, scale_out):
    """``make_qp_quants`` (``_search.qp_search_t``) for non-negative ``xt``: codes ``L`` (float) and scales."""
    n = xt.shape[0]
    fmax = np.float32(nmax)
    mx = np.zeros(G, np.float32)
    for i in range(n):
        xi = xt[i]
        for g in range(G):
            mx[g] = xi[g] if xi[g] > mx[g] else mx[g]
    zero = np.empty(G, np.bool_)
    iscale = np.empty(G, np.float32)
    best = np.zeros(G, np.float32)
    isc = np.empty(G, np.float32)
    sc = np.empty(G, np.float32)
    cur = np.empty(G, np.float32)
    for g in range(G):
        z = mx[g] < _EPS
        zero[g] = z
        mx[g] = _ONE if z else mx[g]
        iscale[g] = fmax / mx[g]
        sc[g] = _ONE / iscale[g]
    for i in range(n):
        xi = xt[i]
        wi = wt[i]
        for g in range(G):
            d = xi[g] - _nearest(xi[g] * iscale[g]) * sc[g]
            best[g] += (d * wi[g]) * d
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        c = _TENTH * np.float32(k) + fmax
        for g in range(G):
            isc[g] = c / mx[g]
            sc[g] = _ONE / isc[g]
            cur[g] = _ZERO
        for i in range(n):
            xi = xt[i]
            wi = wt[i]
            for g in range(G):
                lv = _nearest(xi[g] * isc[g])
                lv = fmax if lv > fmax else lv
                d = xi[g] - lv * sc[g]
                cur[g] += (d * wi[g]) * d
        for g in range(G):
            acc = cur[g] < best[g]
            best[g] = cur[g] if acc else best[g]
            iscale[g] = isc[g] if acc else iscale[g]
    for i in range(n):
        xi = xt[i]
        li = L[i]
        for g in range(G):
            lv = _nearest(xi[g] * iscale[g])
            li[g] = fmax if lv > fmax else lv
    sums = np.empty((2, G), np.float32)
    _descent_lanes(xt, wt, L, G, _ZERO, fmax, _B(True), sums)
    for g in range(G):
        s = sums[0, g] / sums[1, g] if sums[1, g] > _ZERO else _ZERO
        scale_out[g] = _ZERO if zero[g] else s
    for i in range(n):
        li = L[i]
        for g in range(G):
            li[g] = _ZERO if zero[g] else li[g]


@_jit
def _q3_lanes(xt, G, nmax, L, scale_out):
    """``make_q3_quants(do_rmse=True)`` (``_search.q3_search_t``): codes ``L`` (float, 0..2*nmax-1) and scales."""
    n = xt.shape[0]
    fmax = np.float32(nmax)
    lo = -fmax
    hi = fmax - _ONE
    mx = np.empty(G, np.float32)
    _signed_absmax_lanes(xt, G, mx)
    zero = np.empty(G, np.bool_)
    for g in range(G):
        z = abs(mx[g]) < _EPS
        zero[g] = z
        mx[g] = _ONE if z else mx[g]
        mx[g] = (-fmax) / mx[g]  # iscale
    w = np.empty((n, G), np.float32)
    for i in range(n):
        xi = xt[i]
        li = L[i]
        wi = w[i]
        for g in range(G):
            li[g] = _clamp(_nearest(xi[g] * mx[g]), lo, hi)
            wi[g] = xi[g] * xi[g]
    sums = np.empty((2, G), np.float32)
    _descent_lanes(xt, w, L, G, lo, hi, _B(False), sums)
    for g in range(G):
        scale_out[g] = _ZERO if zero[g] else sums[0, g] / sums[1, g]
    for i in range(n):
        li = L[i]
        for g in range(G):
            li[g] = _ZERO if zero[g] else li[g] + fmax


@_jit
def _iq4_scales_lanes(xt, wt, G, d_out):
    """The block-scale search of ``quantize_row_iq4_nl_impl`` with ``ntry = 7`` (``_iq4_common.block_scales``)."""
    n = xt.shape[0]
    mx = np.empty(G, np.float32)
    _signed_absmax_lanes(xt, G, mx)
    skip = np.empty(G, np.bool_)
    inv = np.empty(G, np.float32)
    sqx = np.empty(G, np.float32)
    sq2 = np.empty(G, np.float32)
    best = np.empty(G, np.float32)
    d = np.empty(G, np.float32)
    x2 = np.empty((n, G), np.float32)
    for i in range(n):
        xi = xt[i]
        x2i = x2[i]
        for g in range(G):
            x2i[g] = xi[g] * _TWO
    k0 = _KV[0]
    for g in range(G):
        z = abs(mx[g]) < _EPS
        skip[g] = z
        mx[g] = _ONE if z else mx[g]
        inv[g] = _ONE / ((-mx[g]) / k0)
    for t in range(16):
        if t > 0:
            c = np.float32(t - 8) + k0
            for g in range(G):
                inv[g] = c / mx[g]
        for g in range(G):
            sqx[g] = _ZERO
            sq2[g] = _ZERO
        for i in range(n):
            xi = xt[i]
            x2i = x2[i]
            wi = wt[i]
            for g in range(G):
                q = _IQ4_VAL[_iq4_cell(x2i[g] * inv[g])]
                wq = wi[g] * q
                sqx[g] += wq * xi[g]
                sq2[g] += wq * q
        if t == 0:
            for g in range(G):
                d[g] = sqx[g] / sq2[g]
                best[g] = d[g] * sqx[g]
        else:
            for g in range(G):
                better = sq2[g] > _ZERO and sqx[g] * sqx[g] > best[g] * sq2[g]
                dn = sqx[g] / sq2[g]
                d[g] = dn if better else d[g]
                best[g] = dn * sqx[g] if better else best[g]
    for g in range(G):
        d_out[g] = _ZERO if skip[g] else d[g]


# ------------------------------------------------------------------------------------------ layout helpers


@_jit
def _gather(x, base, n, G, xt):
    """Groups ``g < G`` of ``n`` consecutive values starting at ``x[base]`` -> columns of ``xt`` (n, G)."""
    for g in range(G):
        off = base + g * n
        for i in range(n):
            xt[i, g] = x[off + i]


@_jit
def _block_sumsq(x, start, count, sb, out):
    """Sequential ``Σ x²`` over ``count`` consecutive runs of ``sb`` values from ``x[start]`` -> ``out[:count]``."""
    for s in range(count):
        out[s] = _ZERO
    for e in range(sb):
        for s in range(count):
            v = x[start + s * sb + e]
            out[s] += v * v


@_jit
def _imatrix_weights(xt, qw, G, n, col0, ncol, sigma2, per, wt):
    """``qw[col] * sqrt(sigma2 + x²)`` for ``xt`` (n, G): group ``g`` covers columns ``(col0 + g*n) % ncol + i``
    and uses ``sigma2[g // per]``."""
    for g in range(G):
        c = (col0 + g * n) % ncol
        s2 = sigma2[g // per]
        for i in range(n):
            v = xt[i, g]
            wt[i, g] = np.sqrt(v * v + s2) * qw[c + i]


# -------------------------------------------------------------------------------------- K-quant encoders

_CHUNK_SB = 32
"""Super-blocks per search chunk (8-16 groups each): temporaries of a few tens of KiB, cache resident."""


@_jit
def _pack_q45k(xt, L, c0, S, five, ls, lm, d, dmin, out):
    """Re-quantize the chunk's codes with the stored scales and write super-blocks ``c0 .. c0 + S`` of Q4_K/Q5_K.

    ``ls``/``lm`` (8, S) int64 sub-block scales and mins, ``d``/``dmin`` (S,) fp16-rounded float32."""
    nmax = 31 if five else 15
    fmax = np.float32(nmax)
    ts = 176 if five else 144
    Li = np.empty(256, np.int64)
    for s in range(S):
        o = (c0 + s) * ts
        _put_f16(out, o, d[s])
        _put_f16(out, o + 2, dmin[s])
        for j in range(4):
            out[o + 4 + j] = (ls[j, s] | ((ls[j + 4, s] >> 4) << 6)) & 255
            out[o + 8 + j] = (lm[j, s] | ((lm[j + 4, s] >> 4) << 6)) & 255
            out[o + 12 + j] = ((ls[j + 4, s] & 15) | ((lm[j + 4, s] & 15) << 4)) & 255
        for j in range(8):
            g = s * 8 + j
            dj = d[s] * np.float32(ls[j, s])
            mj = dmin[s] * np.float32(lm[j, s])
            for i in range(32):
                if dj != _ZERO:
                    lv = _clamp(_nearest((xt[i, g] + mj) / dj), _ZERO, fmax)
                else:
                    lv = L[i, g]
                Li[j * 32 + i] = np.int64(lv)
        if five:
            for ln in range(32):
                h = 0
                for k in range(8):
                    h |= (Li[32 * k + ln] >> 4) << k
                out[o + 16 + ln] = h & 255
            q = o + 48
        else:
            q = o + 16
        for c in range(4):
            for ln in range(32):
                out[q + 32 * c + ln] = ((Li[64 * c + ln] & 15) | ((Li[64 * c + 32 + ln] & 15) << 4)) & 255


@_jit
def _enc_q45k_ref(x, out, sb0, sb1, five, rmin, rdelta, nstep):
    """``quantize_row_q{4,5}_K_ref`` for super-blocks ``sb0 .. sb1`` of the flat ``x`` (``five``: Q5_K)."""
    nmax = _I(31) if five else _I(15)
    CH = _CHUNK_SB
    GM = CH * 8
    xt = np.empty((32, GM), np.float32)
    wt = np.empty((32, GM), np.float32)
    L = np.empty((32, GM), np.float32)
    scale = np.empty(GM, np.float32)
    the_min = np.empty(GM, np.float32)
    av = np.empty(GM, np.float32)
    ls = np.empty((8, CH), np.int64)
    lm = np.empty((8, CH), np.int64)
    d = np.empty(CH, np.float32)
    dmin = np.empty(CH, np.float32)
    for c0 in range(sb0, sb1, CH):
        S = min(CH, sb1 - c0)
        G = S * 8
        _gather(x, c0 * 256, _I(32), G, xt)
        for g in range(G):
            av[g] = _ZERO
        for i in range(32):
            for g in range(G):
                v = xt[i, g]
                av[g] += v * v
        for g in range(G):
            av[g] = np.sqrt(av[g] / F(32.0))
        for i in range(32):
            for g in range(G):
                wt[i, g] = abs(xt[i, g]) + av[g]
        _qkx_lanes(xt, wt, G, nmax, rmin, rdelta, nstep, _B(False), _B(True), L, scale, the_min)
        for s in range(S):
            max_scale = _ZERO
            max_min = _ZERO
            for j in range(8):
                v = scale[s * 8 + j]
                max_scale = v if v > max_scale else max_scale
                v = the_min[s * 8 + j]
                max_min = v if v > max_min else max_min
            inv_s = F(63.0) / max_scale if max_scale > _ZERO else _ZERO
            inv_m = F(63.0) / max_min if max_min > _ZERO else _ZERO
            for j in range(8):
                a = np.int64(_nearest(scale[s * 8 + j] * inv_s)) & 255
                b = np.int64(_nearest(the_min[s * 8 + j] * inv_m)) & 255
                ls[j, s] = a if a < 63 else 63
                lm[j, s] = b if b < 63 else 63
            d[s] = _f16_round(max_scale / F(63.0))
            dmin[s] = _f16_round(max_min / F(63.0))
        _pack_q45k(xt, L, c0, S, five, ls, lm, d, dmin, out)


@_jit
def _enc_q45k_imat(x, n_per_row, qw, out, sb0, sb1, five):
    """``quantize_row_q{4,5}_K_impl`` (imatrix ``qw``) for super-blocks ``sb0 .. sb1`` of the flat ``x``."""
    nmax = _I(31) if five else _I(15)
    CH = _CHUNK_SB
    GM = CH * 8
    xt = np.empty((32, GM), np.float32)
    wt = np.empty((32, GM), np.float32)
    L = np.empty((32, GM), np.float32)
    scale = np.empty(GM, np.float32)
    the_min = np.empty(GM, np.float32)
    sig = np.empty(CH, np.float32)
    sw = np.empty(GM, np.float32)
    sc_t = np.empty((8, CH), np.float32)
    mn_t = np.empty((8, CH), np.float32)
    sw_t = np.empty((8, CH), np.float32)
    Ls = np.empty((8, CH), np.float32)
    Lm = np.empty((8, CH), np.float32)
    d_blk = np.empty(CH, np.float32)
    m_blk = np.empty(CH, np.float32)
    ls = np.empty((8, CH), np.int64)
    lm = np.empty((8, CH), np.int64)
    d = np.empty(CH, np.float32)
    dmin = np.empty(CH, np.float32)
    for c0 in range(sb0, sb1, CH):
        S = min(CH, sb1 - c0)
        G = S * 8
        _gather(x, c0 * 256, _I(32), G, xt)
        _block_sumsq(x, c0 * 256, S, _I(256), sig)
        for s in range(S):
            sig[s] = (sig[s] * _TWO) / F(256.0)
        _imatrix_weights(xt, qw, G, _I(32), c0 * 256, n_per_row, sig, _I(8), wt)
        for g in range(G):
            sw[g] = _ZERO
        for i in range(32):
            for g in range(G):
                sw[g] += wt[i, g]
        _qkx_lanes(xt, wt, G, nmax, F(-0.9), F(0.05), _I(36), _B(False), _B(False), L, scale, the_min)
        for s in range(S):
            for j in range(8):
                sc_t[j, s] = scale[s * 8 + j]
                mn_t[j, s] = the_min[s * 8 + j]
                sw_t[j, s] = sw[s * 8 + j]
        _qp_lanes(sc_t, sw_t, S, _I(63), Ls, d_blk)
        _qp_lanes(mn_t, sw_t, S, _I(63), Lm, m_blk)
        for s in range(S):
            for j in range(8):
                ls[j, s] = np.int64(Ls[j, s]) & 255
                lm[j, s] = np.int64(Lm[j, s]) & 255
            d[s] = _f16_round(d_blk[s])
            dmin[s] = _f16_round(m_blk[s])
        _pack_q45k(xt, L, c0, S, five, ls, lm, d, dmin, out)


@_jit
def _enc_q6k(x, n_per_row, qw, has_qw, out, sb0, sb1):
    """Q6_K super-blocks ``sb0 .. sb1`` (210 bytes each)."""
    CH = _CHUNK_SB
    GM = CH * 16
    xt = np.empty((16, GM), np.float32)
    wt = np.empty((16, GM), np.float32)
    L = np.empty((16, GM), np.float32)
    scale = np.empty(GM, np.float32)
    ls = np.empty(16, np.int64)
    Li = np.empty(256, np.int64)
    for c0 in range(sb0, sb1, CH):
        S = min(CH, sb1 - c0)
        G = S * 16
        _gather(x, c0 * 256, _I(16), G, xt)
        if has_qw:
            for g in range(G):
                c = (c0 * 256 + g * 16) % n_per_row
                for i in range(16):
                    wt[i, g] = qw[c + i]
        _qx_lanes(xt, wt, has_qw, G, _I(32), L, scale)
        for s in range(S):
            o = (c0 + s) * 210
            amax = _ZERO
            mxs = _ZERO
            for j in range(16):
                v = scale[s * 16 + j]
                if abs(v) > amax:
                    amax = abs(v)
                    mxs = v
            if abs(mxs) < _EPS:
                for b in range(210):
                    out[o + b] = 0
                continue
            iscale = F(-128.0) / mxs
            d = _f16_round(_ONE / iscale)
            for j in range(16):
                v = _nearest(scale[s * 16 + j] * iscale)
                v = F(127.0) if v > F(127.0) else v
                ls[j] = np.int64(v)
            for j in range(16):
                g = s * 16 + j
                dj = d * np.float32(ls[j])
                for i in range(16):
                    if dj != _ZERO:
                        lv = _clamp(_nearest(xt[i, g] / dj), F(-32.0), F(31.0)) + F(32.0)
                    else:
                        lv = L[i, g]
                    Li[16 * j + i] = np.int64(lv)
            for h in range(2):
                for ln in range(32):
                    e = 128 * h + ln
                    q1 = Li[e]
                    q2 = Li[e + 32]
                    q3 = Li[e + 64]
                    q4 = Li[e + 96]
                    out[o + 64 * h + ln] = ((q1 & 15) | ((q3 & 15) << 4)) & 255
                    out[o + 64 * h + 32 + ln] = ((q2 & 15) | ((q4 & 15) << 4)) & 255
                    hi = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
                    out[o + 128 + 32 * h + ln] = hi & 255
            for j in range(16):
                out[o + 192 + j] = ls[j] & 255
            _put_f16(out, o + 208, d)


@_jit
def _pack_crumbs(out, pos, Li):
    for h in range(2):
        for ln in range(32):
            e = 128 * h + ln
            out[pos + 32 * h + ln] = (Li[e] | (Li[e + 32] << 2) | (Li[e + 64] << 4) | (Li[e + 96] << 6)) & 255


@_jit
def _pack_q3k(xt, L, c0, S, ls, d, out):
    """Re-quantize and write Q3_K super-blocks ``c0 .. c0 + S``: ``ls`` (16, S) scales stored +32, ``d`` (S,)."""
    Li = np.empty(256, np.int64)
    for s in range(S):
        o = (c0 + s) * 110
        for j in range(8):
            out[o + 96 + j] = ((ls[j, s] & 15) | ((ls[j + 8, s] & 15) << 4)) & 255
        for m in range(4):
            out[o + 104 + m] = (
                ((ls[m, s] >> 4) & 3) | (((ls[4 + m, s] >> 4) & 3) << 2) | (((ls[8 + m, s] >> 4) & 3) << 4)
                | (((ls[12 + m, s] >> 4) & 3) << 6)
            )
        _put_f16(out, o + 108, d[s])
        for j in range(16):
            g = s * 16 + j
            dj = d[s] * np.float32((ls[j, s] & 63) - 32)
            for i in range(16):
                if dj != _ZERO:
                    lv = _clamp(_nearest(xt[i, g] / dj), F(-4.0), F(3.0)) + F(4.0)
                else:
                    lv = L[i, g]
                Li[16 * j + i] = np.int64(lv)
        for ln in range(32):
            h = 0
            for k in range(8):
                h |= ((Li[32 * k + ln] >> 2) & 1) << k
            out[o + ln] = h
        for e in range(256):
            Li[e] &= 3
        _pack_crumbs(out, o + 32, Li)


@_jit
def _enc_q3k_ref(x, out, sb0, sb1):
    """``quantize_row_q3_K_ref`` for super-blocks ``sb0 .. sb1`` (110 bytes each)."""
    CH = _CHUNK_SB
    GM = CH * 16
    xt = np.empty((16, GM), np.float32)
    L = np.empty((16, GM), np.float32)
    scale = np.empty(GM, np.float32)
    ls = np.empty((16, CH), np.int64)
    d = np.empty(CH, np.float32)
    for c0 in range(sb0, sb1, CH):
        S = min(CH, sb1 - c0)
        G = S * 16
        _gather(x, c0 * 256, _I(16), G, xt)
        _q3_lanes(xt, G, _I(4), L, scale)
        for s in range(S):
            amax = _ZERO
            mxs = _ZERO
            for j in range(16):
                v = scale[s * 16 + j]
                if abs(v) > amax:
                    amax = abs(v)
                    mxs = v
            if mxs != _ZERO:
                iscale = F(-32.0) / mxs
                for j in range(16):
                    ls[j, s] = np.int64(_clamp(_nearest(scale[s * 16 + j] * iscale), F(-32.0), F(31.0))) + 32
                d[s] = _f16_round(_ONE / iscale)
            else:
                for j in range(16):
                    ls[j, s] = 0
                d[s] = _ZERO
        _pack_q3k(xt, L, c0, S, ls, d, out)


@_jit
def _enc_q3k_imat(x, n_per_row, qw, out, sb0, sb1):
    """``quantize_row_q3_K_impl`` (imatrix ``qw``) for super-blocks ``sb0 .. sb1``."""
    CH = _CHUNK_SB
    GM = CH * 16
    xt = np.empty((16, GM), np.float32)
    wt = np.empty((16, GM), np.float32)
    L = np.empty((16, GM), np.float32)
    scale = np.empty(GM, np.float32)
    sig = np.empty(CH, np.float32)
    sc_t = np.empty((16, CH), np.float32)
    sw_t = np.empty((16, CH), np.float32)
    Ls = np.empty((16, CH), np.float32)
    d_blk = np.empty(CH, np.float32)
    ls = np.empty((16, CH), np.int64)
    d = np.empty(CH, np.float32)
    for c0 in range(sb0, sb1, CH):
        S = min(CH, sb1 - c0)
        G = S * 16
        _gather(x, c0 * 256, _I(16), G, xt)
        _block_sumsq(x, c0 * 256, S, _I(256), sig)
        for s in range(S):
            sig[s] = (sig[s] * _TWO) / F(256.0)
        _imatrix_weights(xt, qw, G, _I(16), c0 * 256, n_per_row, sig, _I(16), wt)
        _qx_lanes(xt, wt, _B(True), G, _I(4), L, scale)
        for s in range(S):
            for j in range(16):
                g = s * 16 + j
                acc = _ZERO
                for i in range(16):
                    acc += wt[i, g]
                sw_t[j, s] = acc
                sc_t[j, s] = scale[g]
        _qx_lanes(sc_t, sw_t, _B(True), S, _I(32), Ls, d_blk)
        for s in range(S):
            for j in range(16):
                ls[j, s] = np.int64(Ls[j, s])
            d[s] = _f16_round(d_blk[s])
        _pack_q3k(xt, L, c0, S, ls, d, out)


@_jit
def _pack_q2k(xt, L, c0, S, byte, d, dmin, out):
    """Re-quantize and write Q2_K super-blocks ``c0 .. c0 + S``: ``byte`` (16, S) scale | min << 4."""
    Li = np.empty(256, np.int64)
    for s in range(S):
        o = (c0 + s) * 84
        for j in range(16):
            out[o + j] = byte[j, s]
            g = s * 16 + j
            dj = d[s] * np.float32(byte[j, s] & 15)
            mj = dmin[s] * np.float32(byte[j, s] >> 4)
            for i in range(16):
                if dj != _ZERO:
                    lv = _clamp(_nearest((xt[i, g] + mj) / dj), _ZERO, F(3.0))
                else:
                    lv = L[i, g]
                Li[16 * j + i] = np.int64(lv)
        _pack_crumbs(out, o + 16, Li)
        _put_f16(out, o + 80, d[s])
        _put_f16(out, o + 82, dmin[s])


@_jit
def _enc_q2k_ref(x, out, sb0, sb1):
    """``quantize_row_q2_K_ref`` for super-blocks ``sb0 .. sb1`` (84 bytes each)."""
    CH = _CHUNK_SB
    GM = CH * 16
    xt = np.empty((16, GM), np.float32)
    wt = np.empty((16, GM), np.float32)
    L = np.empty((16, GM), np.float32)
    scale = np.empty(GM, np.float32)
    the_min = np.empty(GM, np.float32)
    byte = np.empty((16, CH), np.int64)
    d = np.empty(CH, np.float32)
    dmin = np.empty(CH, np.float32)
    for c0 in range(sb0, sb1, CH):
        S = min(CH, sb1 - c0)
        G = S * 16
        _gather(x, c0 * 256, _I(16), G, xt)
        for i in range(16):
            for g in range(G):
                wt[i, g] = abs(xt[i, g])
        _qkx_lanes(xt, wt, G, _I(3), F(-0.5), F(0.1), _I(15), _B(True), _B(True), L, scale, the_min)
        for s in range(S):
            max_scale = _ZERO
            max_min = _ZERO
            for j in range(16):
                v = scale[s * 16 + j]
                max_scale = v if v > max_scale else max_scale
                v = the_min[s * 16 + j]
                max_min = v if v > max_min else max_min
            inv_s = F(15.0) / max_scale if max_scale > _ZERO else _ONE
            inv_m = F(15.0) / max_min if max_min > _ZERO else _ONE
            for j in range(16):
                a = np.int64(_nearest(scale[s * 16 + j] * inv_s)) if max_scale > _ZERO else 0
                b = np.int64(_nearest(the_min[s * 16 + j] * inv_m)) if max_min > _ZERO else 0
                byte[j, s] = (a | (b << 4)) & 255
            d[s] = _f16_round(max_scale / F(15.0))
            dmin[s] = _f16_round(max_min / F(15.0))
        _pack_q2k(xt, L, c0, S, byte, d, dmin, out)


@_jit
def _enc_q2k_imat(x, n_per_row, qw, out, sb0, sb1):
    """``quantize_row_q2_K_impl`` (imatrix ``qw``) for super-blocks ``sb0 .. sb1``."""
    CH = _CHUNK_SB
    GM = CH * 16
    xt = np.empty((16, GM), np.float32)
    wt = np.empty((16, GM), np.float32)
    L = np.empty((16, GM), np.float32)
    scale = np.empty(GM, np.float32)
    the_min = np.empty(GM, np.float32)
    sig = np.empty(CH, np.float32)
    sc_t = np.empty((16, CH), np.float32)
    mn_t = np.empty((16, CH), np.float32)
    sw_t = np.empty((16, CH), np.float32)
    Ls = np.empty((16, CH), np.float32)
    Lm = np.empty((16, CH), np.float32)
    d_blk = np.empty(CH, np.float32)
    m_blk = np.empty(CH, np.float32)
    byte = np.empty((16, CH), np.int64)
    d = np.empty(CH, np.float32)
    dmin = np.empty(CH, np.float32)
    for c0 in range(sb0, sb1, CH):
        S = min(CH, sb1 - c0)
        G = S * 16
        _gather(x, c0 * 256, _I(16), G, xt)
        _block_sumsq(x, c0 * 256, S, _I(256), sig)
        for s in range(S):
            sig[s] = sig[s] / F(256.0)
        _imatrix_weights(xt, qw, G, _I(16), c0 * 256, n_per_row, sig, _I(16), wt)
        _qkx_lanes(xt, wt, G, _I(3), F(-0.9), F(0.05), _I(36), _B(False), _B(False), L, scale, the_min)
        for s in range(S):
            for j in range(16):
                g = s * 16 + j
                acc = _ZERO
                for i in range(16):
                    acc += wt[i, g]
                sw_t[j, s] = acc
                sc_t[j, s] = scale[g]
                mn_t[j, s] = the_min[g]
        _qp_lanes(sc_t, sw_t, S, _I(15), Ls, d_blk)
        _qp_lanes(mn_t, sw_t, S, _I(15), Lm, m_blk)
        for s in range(S):
            for j in range(16):
                byte[j, s] = (np.int64(Ls[j, s]) | (np.int64(Lm[j, s]) << 4)) & 255
            d[s] = _f16_round(d_blk[s])
            dmin[s] = _f16_round(m_blk[s])
        _pack_q2k(xt, L, c0, S, byte, d, dmin, out)


# ---------------------------------------------------------------------------------- legacy / IQ4 encoders

_CHUNK_BLOCKS = 256
"""32-weight blocks per search chunk of the legacy and IQ4 encoders."""


@_jit
def _put_qs32(out, pos, Li):
    for j in range(16):
        out[pos + j] = ((Li[j] & 15) | ((Li[j + 16] & 15) << 4)) & 255


@_jit
def _put_qh32(out, pos, Li):
    h = 0
    for j in range(32):
        h |= ((Li[j] >> 4) & 1) << j
    for b in range(4):
        out[pos + b] = (h >> (8 * b)) & 255


@_jit
def _row_sigma2(x, r0, r1, n, sig):
    """Per row ``Σ x² / n`` (sequential) for rows ``r0 .. r1`` -> ``sig[r - r0]``."""
    for r in range(r0, r1):
        acc = _ZERO
        base = r * n
        for j in range(n):
            v = x[base + j]
            acc += v * v
        sig[r - r0] = acc / np.float32(n)


@_jit
def _put_legacy_codes(out, o, qs_col, bits, x, base, scale, shift, add, top, clamp):
    """Codes ``min(top, trunc((x - shift) * scale + add))`` of the block at ``x[base]`` -> ``qs`` (and ``qh``).

    One pass over the 16 pairs ``(j, j + 16)`` that share a byte; bit 4 of the 5-bit codes collects in a u32."""
    h = np.uint32(0)
    for j in range(16):
        q0 = np.int32((x[base + j] - shift) * scale + add)
        q1 = np.int32((x[base + 16 + j] - shift) * scale + add)
        if clamp:
            q0 = min(q0, top)
            q1 = min(q1, top)
        out[o + qs_col + j] = np.uint8((q0 & 15) | ((q1 & 15) << 4))
        h |= np.uint32((q0 >> 4) & 1) << np.uint32(j)
        h |= np.uint32((q1 >> 4) & 1) << np.uint32(j + 16)
    if bits == 5:
        for k in range(4):
            out[o + qs_col - 4 + k] = np.uint8((h >> np.uint32(8 * k)) & np.uint32(255))


@_jit
def _enc_legacy0_ref(x, out, b0, b1, bits):
    """``quantize_row_q{4,5}_0_ref`` for blocks ``b0 .. b1``: ``d = max / -2^(bits-1)`` with ``max`` the block's
    first value of largest magnitude (``+0.0`` for an all-zero block), codes ``min(top, trunc(x/d + half + 0.5))``.

    The largest magnitude is an integer max over the bit patterns of ``|x|`` (vectorizable, unlike C's
    compare-and-select chain), then the first element with that magnitude gives the sign."""
    xi = x.view(np.int32)
    ts = 18 if bits == 4 else 22
    half = 1 << (bits - 1)
    top = np.int32(2 * half - 1)
    add = np.float32(half) + _HALF
    neg_half = np.float32(-half)
    for b in range(b0, b1):
        base = b * 32
        m = np.int32(0)
        for j in range(32):
            m = max(m, xi[base + j] & 0x7FFFFFFF)
        mx = _ZERO
        for j in range(32):
            if (xi[base + j] & 0x7FFFFFFF) == m:
                mx = x[base + j]
                break
        d = (mx + _ZERO) / neg_half
        inv = _ONE / d if d != _ZERO else _ZERO
        o = b * ts
        _put_f16(out, o, d)
        _put_legacy_codes(out, o, ts - 16, bits, x, base, inv, _ZERO, add, top, _B(True))


@_jit
def _enc_legacy1_ref(x, out, b0, b1, bits):
    """``quantize_row_q{4,5}_1_ref`` for blocks ``b0 .. b1``: ``d = (max - min) / (2^bits - 1)``, ``m = min``,
    codes ``trunc((x - min)/d + 0.5)`` (Q4_1 also clamps to 15).

    The extremes come from integer reductions over sortable keys of the bit patterns (float order, -0.0 just
    below +0.0); a zero extreme then takes the sign of the block's first zero, as C's strict-compare loops do."""
    xi = x.view(np.int32)
    ts = 20 if bits == 4 else 24
    top = np.int32((1 << bits) - 1)
    ftop = np.float32(top)
    keys = np.empty(32, np.int32)
    for b in range(b0, b1):
        base = b * 32
        kmin = np.int32(0x7FFFFFFF)
        kmax = np.int32(-0x7FFFFFFF - 1)
        for j in range(32):
            k = xi[base + j]
            k = k ^ ((k >> 31) & 0x7FFFFFFF)
            keys[j] = k
            kmin = min(kmin, k)
            kmax = max(kmax, k)
        mn = _ZERO
        for j in range(32):
            if keys[j] == kmin:
                mn = x[base + j]
                break
        mx = _ZERO
        for j in range(32):
            if keys[j] == kmax:
                mx = x[base + j]
                break
        if mn == _ZERO or mx == _ZERO:
            for j in range(32):
                v = x[base + j]
                if v == _ZERO:
                    mn = v if mn == _ZERO else mn
                    mx = v if mx == _ZERO else mx
                    break
        d = (mx - mn) / ftop
        inv = _ONE / d if d != _ZERO else _ZERO
        o = b * ts
        _put_f16(out, o, d)
        _put_f16(out, o + 2, mn)
        _put_legacy_codes(out, o, ts - 16, bits, x, base, inv, mn, _HALF, top, bits == 4)


@_jit
def _enc_legacy_imat(x, n_per_row, qw, out, r0, r1, bits, has_min):
    """``quantize_row_q{4,5}_{0,1}_impl`` (imatrix ``qw``) for rows ``r0 .. r1``."""
    nb_row = n_per_row // 32
    ts = 2 + 2 * has_min + 4 * (bits == 5) + 16
    qs_col = ts - 16
    half = _I(1 << (bits - 1))
    top = _I((1 << bits) - 1)
    Li = np.empty(32, np.int64)
    b0 = r0 * nb_row
    b1 = r1 * nb_row
    CH = _CHUNK_BLOCKS
    xt = np.empty((32, CH), np.float32)
    wt = np.empty((32, CH), np.float32)
    L = np.empty((32, CH), np.float32)
    dd = np.empty(CH, np.float32)
    mm = np.empty(CH, np.float32)
    sig_rows = np.empty(r1 - r0, np.float32)
    _row_sigma2(x, r0, r1, n_per_row, sig_rows)
    sig = np.empty(CH, np.float32)
    for c0 in range(b0, b1, CH):
        G = min(CH, b1 - c0)
        _gather(x, c0 * 32, _I(32), G, xt)
        for g in range(G):
            sig[g] = sig_rows[(c0 + g) // nb_row - r0]
        _imatrix_weights(xt, qw, G, _I(32), c0 * 32, n_per_row, sig, _I(1), wt)
        if has_min:
            _qkx_lanes(xt, wt, G, top, F(-0.9), F(0.05), _I(36), _B(False), _B(False), L, dd, mm)
        else:
            _qx_lanes(xt, wt, _B(True), G, half, L, dd)
        for g in range(G):
            o = (c0 + g) * ts
            for j in range(32):
                Li[j] = np.int64(L[j, g])
            _put_f16(out, o, dd[g])
            if has_min:
                # ggml stores m = its final min: +0.0 when zero, except in flat blocks (max <= min), which keep
                # the block's first minimum with its sign (the reference's ``first_min``).
                hi = xt[0, g]
                lo = xt[0, g]
                for j in range(32):
                    v = xt[j, g]
                    lo = v if v < lo else lo
                    hi = v if v > hi else hi
                lc = _ZERO if lo > _ZERO else lo
                m = lo if hi <= lc else (-mm[g]) + _ZERO
                _put_f16(out, o + 2, m)
            if bits == 5:
                _put_qh32(out, o + qs_col - 4, Li)
            _put_qs32(out, o + qs_col, Li)


@_jit
def _enc_q8_0(x, out, b0, b1):
    """Q8_0 blocks ``b0 .. b1`` (34 bytes each), as the reference: ``d = amax / 127``, ``q = roundf(x / d)``."""
    xi = x.view(np.int32)
    amax_bits = np.empty(1, np.int32)
    amax_f = amax_bits.view(np.float32)
    for b in range(b0, b1):
        base = b * 32
        o = b * 34
        m = np.int32(0)
        for j in range(32):  # the largest |x| as the largest bit pattern of |x| (finite weights)
            a = xi[base + j] & 0x7FFFFFFF
            m = a if a > m else m
        amax_bits[0] = m
        d = amax_f[0] / F(127.0)
        inv = _ZERO if d == _ZERO else _ONE / d
        _put_f16(out, o, d)
        for j in range(32):
            v = x[base + j] * inv
            r = np.int32(np.float32(np.floor(abs(v) + _HALF)))
            r = -r if v < _ZERO else r
            out[o + 2 + j] = r & 255


@_jit
def _enc_iq4(x, n_per_row, qw, has_qw, out, r0, r1, xs):
    """IQ4_NL (``xs`` False, 18-byte blocks) / IQ4_XS (136-byte super-blocks) for rows ``r0 .. r1``.

    Returns 1 if an IQ4_NL block scale is not finite (the caller raises), else 0.
    """
    sb = 256 if xs else 32
    nsub = sb // 32
    nb_row = n_per_row // 32
    CH = _CHUNK_BLOCKS
    xt = np.empty((32, CH), np.float32)
    wt = np.empty((32, CH), np.float32)
    d = np.empty(CH, np.float32)
    sig = np.empty(CH // nsub, np.float32)
    Li = np.empty(32, np.int64)
    ls = np.empty(8, np.int64)
    b0 = r0 * nb_row
    b1 = r1 * nb_row
    for c0 in range(b0, b1, CH):
        G = min(CH, b1 - c0)
        _gather(x, c0 * 32, _I(32), G, xt)
        if has_qw:
            nsb = G // nsub
            _block_sumsq(x, c0 * 32, nsb, sb, sig)
            for s in range(nsb):
                sig[s] = sig[s] * (_TWO / np.float32(sb))
            _imatrix_weights(xt, qw, G, _I(32), c0 * 32, n_per_row, sig, nsub, wt)
        else:
            for i in range(32):
                for g in range(G):
                    wt[i, g] = xt[i, g] * xt[i, g]
        _iq4_scales_lanes(xt, wt, G, d)
        if not xs:
            for g in range(G):
                dg = d[g]
                if not np.isfinite(dg):
                    return 1
                inv = _ONE / dg if dg != _ZERO else _ZERO
                o = (c0 + g) * 18
                _put_f16(out, o, dg)
                for j in range(32):
                    Li[j] = _IQ4_IDX[_iq4_cell((xt[j, g] * inv) * _TWO)]
                _put_qs32(out, o + 2, Li)
            continue
        for s in range(G // 8):
            o = ((c0 + s * 8) // 8) * 136
            amax = _ZERO
            mxs = _ZERO
            for k in range(8):
                v = d[s * 8 + k]
                # the reference's ``nan_to_num_(nan=0.0)``: NaN -> 0, +-inf -> +-FLT_MAX
                v = _ZERO if np.isnan(v) else v
                v = _FMAX if v == np.inf else v
                v = -_FMAX if v == -np.inf else v
                d[s * 8 + k] = v
                if abs(v) > amax:
                    amax = abs(v)
                    mxs = v
            dsb = (-(mxs + _ZERO)) / F(32.0)
            inv = _ONE / dsb if dsb != _ZERO else _ZERO
            sh = 0
            for k in range(8):
                lv = _clamp(_nearest(inv * d[s * 8 + k]), F(-32.0), F(31.0))
                dl = dsb * lv
                idl = _ONE / dl if dl != _ZERO else _ZERO
                g = s * 8 + k
                for j in range(32):
                    Li[j] = _IQ4_IDX[_iq4_cell((xt[j, g] * idl) * _TWO)]
                _put_qs32(out, o + 8 + 16 * k, Li)
                ls[k] = np.int64(lv) + 32
                sh |= (ls[k] >> 4) << (2 * k)
            _put_f16(out, o, dsb)
            out[o + 2] = sh & 255
            out[o + 3] = (sh >> 8) & 255
            for k in range(4):
                out[o + 4 + k] = ((ls[2 * k] & 15) | ((ls[2 * k + 1] & 15) << 4)) & 255
    return 0


# ------------------------------------------------------------------------------------------------ driver

_TYPE_INFO = {  # name -> (block size, type size)
    "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
    "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210),
    "iq4_nl": (32, 18), "iq4_xs": (256, 136),
}

PARALLEL_MIN_ELEMENTS = {"q8_0": 1 << 18, "q4_0": 1 << 18, "q4_1": 1 << 18, "q5_0": 1 << 18, "q5_1": 1 << 18}
"""Tensors with fewer weights than this (by type; 1 << 14 for the searching types) run on the calling thread
alone: below it, handing work to another thread costs about as much as it saves. The legacy types count only
without an imatrix (their ref quantizers are one pass)."""
_SEARCH_MIN_ELEMENTS = 1 << 14

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _pool(size: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``size`` worker threads (the kernels release the GIL)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < size:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(size, thread_name_prefix="quantforge-cpu")
            _POOL_SIZE = size
        return _POOL


def _run_rows(name: str, x: np.ndarray, n: int, qw: np.ndarray | None, out: np.ndarray, r0: int, r1: int) -> int:
    """Quantize rows ``r0 .. r1`` of the flat float32 ``x`` (``n`` per row) into the flat ``out``; returns 1 when an
    IQ4_NL block scale is not finite, else 0."""
    bs = _TYPE_INFO[name][0]
    s0, s1 = r0 * (n // bs), r1 * (n // bs)
    if name in ("q4_k", "q5_k"):
        five = name == "q5_k"
        if qw is None:
            rmin, rdelta, nstep = (F(-0.5), F(0.1), 15) if five else (F(-1.0), F(0.1), 20)
            _enc_q45k_ref(x, out, s0, s1, five, rmin, rdelta, nstep)
        else:
            _enc_q45k_imat(x, n, qw, out, s0, s1, five)
    elif name == "q6_k":
        _enc_q6k(x, n, _NO_QW if qw is None else qw, qw is not None, out, s0, s1)
    elif name == "q3_k":
        _enc_q3k_ref(x, out, s0, s1) if qw is None else _enc_q3k_imat(x, n, qw, out, s0, s1)
    elif name == "q2_k":
        _enc_q2k_ref(x, out, s0, s1) if qw is None else _enc_q2k_imat(x, n, qw, out, s0, s1)
    elif name == "q8_0":
        _enc_q8_0(x, out, s0, s1)
    elif name in ("iq4_nl", "iq4_xs"):
        return int(_enc_iq4(x, n, _NO_QW if qw is None else qw, qw is not None, out, r0, r1, name == "iq4_xs"))
    else:
        bits = 5 if name.startswith("q5") else 4
        has_min = name.endswith("_1")
        if qw is None:
            (_enc_legacy1_ref if has_min else _enc_legacy0_ref)(x, out, s0, s1, bits)
        else:
            _enc_legacy_imat(x, n, qw, out, r0, r1, bits, has_min)
    return 0


_NO_QW = np.zeros(1, np.float32)


def _workers(name: str, rows: int, n: int, has_imatrix: bool) -> int:
    """How many threads share the rows: ``torch.get_num_threads()``, or 1 for small tensors (see
    :data:`PARALLEL_MIN_ELEMENTS`)."""
    one_pass = name == "q8_0" or (not has_imatrix and name in PARALLEL_MIN_ELEMENTS)
    min_elems = PARALLEL_MIN_ELEMENTS[name] if one_pass else _SEARCH_MIN_ELEMENTS
    if rows * n < min_elems:
        return 1
    return max(1, min(torch.get_num_threads(), rows))


def _run_split(name: str, x: np.ndarray, n: int, qw: np.ndarray | None, out: np.ndarray, rows: int,
               workers: int) -> int:
    """Rows in ``workers`` contiguous shares: the calling thread takes the first, the pool the others."""
    if workers <= 1:
        return _run_rows(name, x, n, qw, out, 0, rows)
    step = -(-rows // workers)
    parts = [(r, min(rows, r + step)) for r in range(0, rows, step)]
    pool = _pool(len(parts) - 1)
    futures = [pool.submit(_run_rows, name, x, n, qw, out, a, b) for a, b in parts[1:]]
    bad = _run_rows(name, x, n, qw, out, *parts[0])
    return max([bad] + [f.result() for f in futures])


def _as_f32(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a flat C-contiguous float32 NumPy array (no copy when it already is one)."""
    return np.ascontiguousarray(t.detach().to(device="cpu", dtype=torch.float32).numpy()).reshape(-1)


def quantize(name: str, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float CPU tensor -> ``(rows, n / block * type_size)`` uint8, the same bytes as the reference
    codec ``name`` (shapes are assumed validated by the caller). ``imatrix`` ``(n,)`` is ignored by Q8_0.

    Raises :class:`~quantforge.errors.InputError` where the reference does: an IQ4_NL block scale that is not
    finite (llama.cpp would store NaN)."""
    bs, ts = _TYPE_INFO[name]
    rows, n = weight.shape
    x = _as_f32(weight)
    qw = _as_f32(imatrix) if imatrix is not None and name != "q8_0" else None
    out = np.empty(rows * (n // bs) * ts, np.uint8)
    if _run_split(name, x, n, qw, out, rows, _workers(name, rows, n, qw is not None)):
        raise InputError(
            "IQ4_NL scale search gave a non-finite block scale (non-finite weights, or an imatrix that is zero over "
            "a whole 32-column block, where llama.cpp stores NaN and fails validation); give every column a "
            "positive imatrix value or quantize without the imatrix"
        )
    return torch.from_numpy(out).reshape(rows, n // bs * ts)
