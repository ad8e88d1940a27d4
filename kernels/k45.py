"""Q4_K and Q5_K: super-blocks of 256 weights in 8 sub-blocks of 32, which differ only in a fifth code bit.

* Q4_K (144 bytes, 4.5 bpw): ``d: f16, dmin: f16, scales[12], qs[128]``;
* Q5_K (176 bytes, 5.5 bpw): ``d: f16, dmin: f16, scales[12], qh[32], qs[128]``.

Sub-block ``j`` has a 6-bit scale ``sc_j`` and min ``m_j`` (packed as in GGUF.md §1); ``y = d*sc_j*q - dmin*m_j``.
``qs[32c + l]`` holds the low four bits of element ``64c + l`` in its low nibble and of ``64c + 32 + l`` in its high
nibble; in Q5_K bit 4 of element ``32j + l`` is bit ``j`` of ``qh[l]``.

Quantization follows ``quantize_row_q{4,5}_K_ref`` without an imatrix and ``quantize_row_q{4,5}_K_impl`` with one
(GGUF.md §2.2), vectorized over all super-blocks (:mod:`._kq_common`, :mod:`._search`); the Triton dequantize goes
through the registry tiles (:mod:`.tiles`).

CUDA tensors are quantized by one Triton kernel (:func:`quantize_triton`) with the reference's bytes, with and
without an imatrix: each program takes ``BLOCK_S`` super-blocks as a ``(BLOCK_S, 8)`` tile of sub-blocks and walks
the 32 positions of a sub-block in order for every pass of the search, so each sub-block's float32 sums are the
reference's sequential sums (the imatrix path's ``make_qp_quants`` of the eight sub-block scales sums the tile's
columns left to right); every operation rounds once (``enable_fp_fusion=False``, ``div_rn``, ``sqrt_rn``,
round-half-even through ``(v + 1.5 * 2**23) - 1.5 * 2**23``, exact for the code ranges here). Error-feedback
rounding calls it once per 256-column block with the imatrix, where the PyTorch codec's ~4,000 small launches
per call would bound the GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UnsupportedFormat
from ..formats import QuantFormat, get_format
from ._kq_common import Q45_IMATRIX_SEARCH, byte_blocks, fp16_bytes, q45_encode, q45_scales, quantize_rows
from ._search import f32, qp_steps
from ._triton import HAVE_TRITON, check_launchable, tl, triton

BLOCK_S = 32
"""Super-blocks per Triton program (a (32, 8) tile of sub-blocks; 32 KB of weights, re-read from L1 by each pass)."""

if HAVE_TRITON:

    @triton.jit
    def rne(v):
        """Round half to even (ggml's ``nearest_int``) for |v| < 2**22; larger values stay beyond any code range
        (so a clamp afterwards gives the reference's code). Shared by the Q6_K and Q8_0 kernels."""
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def store_f16(ptr, v, mask):
        """Store float32 ``v`` as little-endian fp16 bytes (round to nearest even) at ``ptr``, ``ptr + 1``."""
        b = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        tl.store(ptr, (b & 255).to(tl.uint8), mask=mask)
        tl.store(ptr + 1, ((b >> 8) & 255).to(tl.uint8), mask=mask)

    @triton.jit
    def _codes(x, m, isc, NMAX: tl.constexpr):
        return tl.minimum(tl.maximum(rne((x - m) * isc), 0.0), NMAX)

    @triton.jit
    def _weight(xi, wbase, i, mask, av, sigma2, HAS_QW: tl.constexpr):
        """The search's weight of element ``i`` of each sub-block: ``qw sqrt(σ² + x²)`` with an imatrix, else
        ``|x| + av``."""
        if HAS_QW:
            return tl.sqrt_rn(xi * xi + sigma2) * tl.load(wbase + i, mask=mask, other=0.0)
        else:
            return tl.abs(xi) + av

    @triton.jit
    def _col(t, j, c):
        """Column ``c`` of a ``(BLOCK_S, 8)`` float tile, exactly (the other lanes add -0.0)."""
        return tl.sum(tl.where(j[None, :] == c, t, -0.0), axis=1)

    @triton.jit
    def _qp_mse(v, sw, lv, s, j):
        """``Σ_c sw (v - s lv)²`` over the 8 columns, left to right."""
        d = v - lv * s[:, None]
        e = (d * sw) * d
        acc = tl.zeros_like(s)
        for c in range(8):
            acc = acc + _col(e, j, c)
        return acc

    @triton.jit
    def _qp_search(v, sw, j, qp_ptr, NMAX: tl.constexpr):
        """ggml's ``make_qp_quants`` on each row of ``v`` ``(BLOCK_S, 8)`` (weights ``sw``): the least-squares
        scale and the codes ``(BLOCK_S, 8)`` (float, at most ``NMAX``; the reference's operation order). Its loops
        stay loops: unrolled, the two searches of the imatrix path took ptxas about a minute per kernel."""
        mx = tl.maximum(tl.max(v, axis=1), 0.0)
        zero = mx < 1e-15
        mx = tl.where(zero, 1.0, mx)
        one = tl.zeros_like(mx) + 1.0
        iscale = tl.math.div_rn(one * NMAX, mx)
        best = _qp_mse(v, sw, rne(v * iscale[:, None]), tl.math.div_rn(one, iscale), j)
        for k in range(8):
            isc = tl.math.div_rn(one * tl.load(qp_ptr + k), mx)
            cur = _qp_mse(v, sw, tl.minimum(rne(v * isc[:, None]), NMAX), tl.math.div_rn(one, isc), j)
            acc = cur < best
            best = tl.where(acc, cur, best)
            iscale = tl.where(acc, isc, iscale)
        L = tl.minimum(rne(v * iscale[:, None]), NMAX)
        wx = sw * v
        sumlx = tl.zeros_like(mx)
        suml2 = tl.zeros_like(mx)
        for c in range(8):
            sumlx = sumlx + _col(wx * L, j, c)
            suml2 = suml2 + _col((sw * L) * L, j, c)
        # coordinate descent, 5 passes: a pass that moves nothing leaves the state as it was, so running every
        # pass is the reference's early exit
        for _p in range(5):
            for c in range(8):
                xc = _col(v, j, c)
                wc = _col(sw, j, c)
                wxc = _col(wx, j, c)
                lc = _col(L, j, c)
                slx = sumlx - wxc * lc
                sl2 = suml2 - (wc * lc) * lc
                go = (slx > 0) & (sl2 > 0)
                new = tl.minimum(rne(tl.math.div_rn(xc * sl2, tl.where(go, slx, 1.0))), NMAX)
                go = go & (new != lc)
                slx = slx + wxc * new
                sl2 = sl2 + (wc * new) * new
                go = go & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
                L = tl.where((j[None, :] == c) & go[:, None], new[:, None], L)
                sumlx = tl.where(go, slx, sumlx)
                suml2 = tl.where(go, sl2, suml2)
        scale = tl.where(suml2 > 0, tl.math.div_rn(sumlx, tl.where(suml2 > 0, suml2, 1.0)), 0.0)
        return tl.where(zero, 0.0, scale), tl.where(zero[:, None], 0.0, L)

    @triton.jit(do_not_specialize=["S", "SB_ROW"])  # one compile for every tensor shape
    def _q45_kernel(x_ptr, qw_ptr, out_ptr, cand_ptr, qp_ptr, S, SB_ROW, NMAX: tl.constexpr, NSTEP: tl.constexpr,
                    FIVE: tl.constexpr, HAS_QW: tl.constexpr, TYPE_SIZE: tl.constexpr, BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)
        sb = pid * BLOCK_S + tl.arange(0, BLOCK_S)
        j = tl.arange(0, 8)
        ok = sb < S
        mask = ok[:, None] & (j[None, :] < 8)
        base = x_ptr + sb.to(tl.int64)[:, None] * 256 + j[None, :] * 32
        wbase = qw_ptr + (sb % SB_ROW)[:, None] * 256 + j[None, :] * 32
        zero = tl.zeros([BLOCK_S, 8], dtype=tl.float32)
        # pass 1: sum of squares, min, max (sequential over the 32 positions)
        sq = zero
        mn = tl.load(base, mask=mask, other=0.0)
        mx = mn
        for i in range(32):
            xi = tl.load(base + i, mask=mask, other=0.0)
            sq = sq + xi * xi
            mn = tl.minimum(mn, xi)
            mx = tl.maximum(mx, xi)
        av = tl.sqrt_rn(tl.math.div_rn(sq, zero + 32.0))
        sigma2 = zero
        if HAS_QW:  # σ² = 2 Σx² / 256 over the super-block, summed left to right
            ss = tl.zeros([BLOCK_S], dtype=tl.float32)
            row = x_ptr + sb.to(tl.int64) * 256
            for i in range(256):
                xi = tl.load(row + i, mask=ok, other=0.0)
                ss = ss + xi * xi
            sigma2 = zero + tl.math.div_rn(ss * 2.0, tl.zeros_like(ss) + 256.0)[:, None]
        # pass 2: the weights, sum_w, sum_x = sum(w * x)
        sum_w = zero
        sum_x = zero
        for i in range(32):
            xi = tl.load(base + i, mask=mask, other=0.0)
            w = _weight(xi, wbase, i, mask, av, sigma2, HAS_QW)
            sum_w = sum_w + w
            sum_x = sum_x + w * xi
        mn = tl.minimum(mn, 0.0)
        flat = mx == mn
        rng = tl.where(flat, 1.0, mx - mn)
        iscale = tl.math.div_rn(zero + NMAX, rng)
        scale = tl.math.div_rn(zero + 1.0, iscale)
        best = zero
        for i in range(32):
            xi = tl.load(base + i, mask=mask, other=0.0)
            w = _weight(xi, wbase, i, mask, av, sigma2, HAS_QW)
            d = _codes(xi, mn, iscale, NMAX) * scale + mn - xi
            best = best + d * d * w
        best_iscale = iscale
        best_base = mn
        cur_min = mn
        for k in range(NSTEP + 1):
            isc = tl.math.div_rn(zero + tl.load(cand_ptr + k), mx - cur_min)
            sum_l = zero
            sum_l2 = zero
            sum_xl = zero
            for i in range(32):
                xi = tl.load(base + i, mask=mask, other=0.0)
                w = _weight(xi, wbase, i, mask, av, sigma2, HAS_QW)
                a = w * _codes(xi, cur_min, isc, NMAX)
                sum_l = sum_l + a
                sum_l2 = sum_l2 + a * _codes(xi, cur_min, isc, NMAX)
                sum_xl = sum_xl + a * xi
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = tl.math.div_rn(sum_w * sum_xl - sum_x * sum_l, D)
            this_min = tl.math.div_rn(sum_l2 * sum_x - sum_l * sum_xl, D)
            over = this_min > 0
            this_min = tl.where(over, 0.0, this_min)
            this_scale = tl.where(over, tl.math.div_rn(sum_xl, sum_l2), this_scale)
            cur = zero
            for i in range(32):
                xi = tl.load(base + i, mask=mask, other=0.0)
                w = _weight(xi, wbase, i, mask, av, sigma2, HAS_QW)
                d = _codes(xi, cur_min, isc, NMAX) * this_scale + this_min - xi
                cur = cur + d * d * w
            acc = (D > 0) & (cur < best)
            best = tl.where(acc, cur, best)
            scale = tl.where(acc, this_scale, scale)
            best_iscale = tl.where(acc, isc, best_iscale)
            best_base = tl.where(acc, cur_min, best_base)
            cur_min = tl.where(acc, this_min, cur_min)
        the_min = -tl.where(flat, mn, cur_min)
        scale = tl.where(flat, 0.0, scale)
        if HAS_QW:  # super-block scales: make_qp_quants of the sub-block scales and mins, weighted by sum_w
            d_blk, lsf = _qp_search(scale, sum_w, j, qp_ptr, 63)
            m_blk, lmf = _qp_search(the_min, sum_w, j, qp_ptr, 63)
            ls = lsf.to(tl.int32) & 255
            lm = lmf.to(tl.int32) & 255
            d16 = d_blk.to(tl.float16)
            m16 = m_blk.to(tl.float16)
        else:  # super-block scales: 6-bit sub-block scales and mins against the largest of each
            max_scale = tl.max(scale, axis=1)
            max_scale = tl.where(max_scale > 0, max_scale, 0.0)
            max_min = tl.max(the_min, axis=1)
            max_min = tl.where(max_min > 0, max_min, 0.0)
            one = tl.zeros([BLOCK_S], dtype=tl.float32) + 1.0
            inv_s = tl.where(max_scale > 0, tl.math.div_rn(one * 63.0, tl.where(max_scale > 0, max_scale, 1.0)),
                             0.0)
            inv_m = tl.where(max_min > 0, tl.math.div_rn(one * 63.0, tl.where(max_min > 0, max_min, 1.0)), 0.0)
            ls = tl.minimum(rne(scale * inv_s[:, None]).to(tl.int32) & 255, 63)
            lm = tl.minimum(rne(the_min * inv_m[:, None]).to(tl.int32) & 255, 63)
            d16 = tl.math.div_rn(max_scale, one * 63.0).to(tl.float16)
            m16 = tl.math.div_rn(max_min, one * 63.0).to(tl.float16)
        dj = d16.to(tl.float32)[:, None] * ls.to(tl.float32)
        mj = m16.to(tl.float32)[:, None] * lm.to(tl.float32)
        out = out_ptr + sb.to(tl.int64) * TYPE_SIZE
        store_f16(out, d16.to(tl.float32), ok)
        store_f16(out + 2, m16.to(tl.float32), ok)
        for c in tl.static_range(4):
            s_lo = tl.sum(tl.where(j[None, :] == c, ls, 0), axis=1)
            s_hi = tl.sum(tl.where(j[None, :] == c + 4, ls, 0), axis=1)
            m_lo = tl.sum(tl.where(j[None, :] == c, lm, 0), axis=1)
            m_hi = tl.sum(tl.where(j[None, :] == c + 4, lm, 0), axis=1)
            tl.store(out + 4 + c, (s_lo | ((s_hi >> 4) << 6)).to(tl.uint8), mask=ok)
            tl.store(out + 8 + c, (m_lo | ((m_hi >> 4) << 6)).to(tl.uint8), mask=ok)
            tl.store(out + 12 + c, ((s_hi & 15) | ((m_hi & 15) << 4)).to(tl.uint8), mask=ok)
        # final pass: the search's codes, re-quantized with the stored scales (a zero scale keeps them)
        QS: tl.constexpr = 48 if FIVE else 16
        shift = (j % 2) * 4
        pair = tl.arange(0, 4)
        for i in range(32):
            xi = tl.load(base + i, mask=mask, other=0.0)
            L = _codes(xi, best_base, best_iscale, NMAX)
            L = tl.where(flat, 0.0, L)
            new = tl.minimum(tl.maximum(rne(tl.math.div_rn(xi + mj, tl.where(dj != 0, dj, 1.0))), 0.0), NMAX)
            q = tl.where(dj != 0, new, L).to(tl.int32)
            if FIVE:
                tl.store(out + 16 + i, tl.sum((q >> 4) << j[None, :], axis=1).to(tl.uint8), mask=ok)
                q = q & 15
            packed = tl.sum(tl.reshape(q << shift[None, :], [BLOCK_S, 4, 2]), axis=2)
            tl.store(out[:, None] + QS + 32 * pair[None, :] + i, packed.to(tl.uint8), mask=ok[:, None])


@functools.lru_cache(maxsize=None)
def device_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A float32 table on ``device``, made once: a fresh host-to-device copy per launch would make the launching
    thread wait for the device's queue to drain (a pageable copy synchronizes the stream)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def triton_io(weight: torch.Tensor, fmt: QuantFormat,
              check: Callable[[torch.Tensor], object]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The common start of a Triton quantize launch: ``weight`` ``(rows, n)`` as contiguous float32, the uint8
    output ``(rows, n/block*type_size)`` and the number of blocks. ``check(first_row)`` is the reference codec on
    one row, called only to raise its error for a row length that is not a whole number of blocks."""
    check_launchable(weight.device.type)
    if weight.dim() != 2 or weight.shape[1] % fmt.block_size:
        check(weight[:1])
    x = weight.to(torch.float32).contiguous()
    out = torch.empty((x.shape[0], x.shape[1] // fmt.block_size * fmt.type_size), dtype=torch.uint8,
                      device=x.device)
    return x, out, x.numel() // fmt.block_size


@dataclass(frozen=True)
class K45Codec:
    """The registry codec of Q4_K (``five_bit=False``) or Q5_K; ``ref_search`` is the ``make_qkx2_quants``
    (rmin, rdelta, nstep) of the no-imatrix path."""

    name: str
    five_bit: bool
    ref_search: tuple[float, float, int]

    @property
    def fmt(self) -> QuantFormat:
        return get_format(self.name)

    def _encode(self, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        d, dmin, scales, L = q45_encode(x, qw, 31 if self.five_bit else 15, self.ref_search)
        parts = [fp16_bytes(d), fp16_bytes(dmin), scales]
        if self.five_bit:
            bits = torch.arange(8, dtype=torch.int32, device=x.device).view(1, 8, 1)
            parts.append(((L.reshape(-1, 8, 32) >> 4) << bits).sum(dim=1, dtype=torch.int32))
            L = L & 15
        q = L.reshape(-1, 4, 2, 32)
        parts.append((q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128))
        return torch.cat(parts, dim=1).to(torch.uint8)

    def quantize(self, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        """``(rows, n)`` float -> ``(rows, n/256*type_size)`` uint8, as ggml (ref path without imatrix).

        CUDA tensors go to the Triton kernel (:meth:`quantize_triton`, same bytes)."""
        if weight.is_cuda and HAVE_TRITON:
            return self.quantize_triton(weight, imatrix)
        return self.quantize_reference(weight, imatrix)

    def quantize_reference(self, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        """The vectorized PyTorch codec (any device; the C kernels on CPU unless ``QUANTFORGE_CPU_KERNELS=torch``)
        that :meth:`quantize_triton` reproduces byte for byte."""
        return quantize_rows(weight, imatrix, self.fmt, self._encode)

    def quantize_triton(self, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`quantize` as one Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``): ``(rows, n)`` float ->
        ``(rows, n/256*type_size)`` uint8, the reference's bytes with and without ``imatrix`` ``(n,)``."""
        fmt = self.fmt
        x, out, S = triton_io(weight, fmt, lambda r: quantize_rows(r, None, fmt, self._encode))
        if S == 0:
            return out
        qw = x
        search = self.ref_search
        if imatrix is not None:
            if imatrix.dim() != 1 or imatrix.shape[0] != x.shape[1]:
                raise UnsupportedFormat(f"imatrix for {fmt.name} must have one value per column ({x.shape[1]},), "
                                        f"got shape {tuple(imatrix.shape)}")
            qw = imatrix.to(device=x.device, dtype=torch.float32).contiguous()
            search = Q45_IMATRIX_SEARCH
        nmax = 31 if self.five_bit else 15
        grid = (triton.cdiv(S, BLOCK_S),)
        cand, qp = self._candidates(x.device, search), device_constant(qp_steps(63), x.device)
        _q45_kernel[grid](x, qw, out, cand, qp, S, x.shape[1] // 256, NMAX=nmax, NSTEP=search[2], FIVE=self.five_bit,
                          HAS_QW=imatrix is not None, TYPE_SIZE=fmt.type_size, BLOCK_S=BLOCK_S, num_warps=4,
                          enable_fp_fusion=False)
        return out

    def _candidates(self, device: torch.device, search: tuple[float, float, int]) -> torch.Tensor:
        """The search's code ranges ``rmin + rdelta * k + nmax`` (float32), on ``device``."""
        rmin, rdelta, nstep = search
        nmax = 31 if self.five_bit else 15
        return device_constant(tuple(f32(f32(f32(rmin) + f32(f32(rdelta) * k)) + nmax) for k in range(nstep + 1)),
                               device)

    def dequantize(self, data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
        b = byte_blocks(data, self.fmt)
        dl, ml = q45_scales(b)
        dev = b.device
        lo = (b[:, -128:].reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.int32, device=dev).view(
            1, 1, 2, 1)) & 15
        q = lo.reshape(-1, 8, 32)
        if self.five_bit:
            q = q | (((b[:, 16:48].reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.int32, device=dev).view(
                1, 8, 1)) & 1) << 4)
        return (dl * q.to(torch.float32) - ml).reshape(data.shape[0], -1).to(dtype)

    def dequantize_triton(self, data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Triton dequantize through the registry tile (:mod:`.tiles`), same values as :meth:`dequantize`."""
        from . import tiles

        return tiles.dequantize(self.fmt, data, dtype)


Q4_K = K45Codec("q4_k", False, (-1.0, 0.1, 20))
Q5_K = K45Codec("q5_k", True, (-0.5, 0.1, 15))
