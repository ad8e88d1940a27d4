"""Q4_K and Q5_K: super-blocks of 256 weights in 8 sub-blocks of 32, which differ only in a fifth code bit.

* Q4_K (144 bytes, 4.5 bpw): ``d: f16, dmin: f16, scales[12], qs[128]``;
* Q5_K (176 bytes, 5.5 bpw): ``d: f16, dmin: f16, scales[12], qh[32], qs[128]``.

Sub-block ``j`` has a 6-bit scale ``sc_j`` and min ``m_j`` (packed as in GGUF.md §1); ``y = d*sc_j*q - dmin*m_j``.
``qs[32c + l]`` holds the low four bits of element ``64c + l`` in its low nibble and of ``64c + 32 + l`` in its high
nibble; in Q5_K bit 4 of element ``32j + l`` is bit ``j`` of ``qh[l]``.

Quantization follows ``quantize_row_q{4,5}_K_ref`` without an imatrix and ``quantize_row_q{4,5}_K_impl`` with one
(GGUF.md §2.2), vectorized over all super-blocks (:mod:`._kq_common`, :mod:`._search`); the Triton dequantize goes
through the registry tiles (:mod:`.tiles`).

Without an imatrix, CUDA tensors are quantized by one Triton kernel (:func:`quantize_triton`) with the reference's
bytes: each program takes ``BLOCK_S`` super-blocks as a ``(BLOCK_S, 8)`` tile of sub-blocks and walks the 32
positions of a sub-block in order for every pass of the search, so each sub-block's float32 sums are the
reference's sequential sums; every operation rounds once (``enable_fp_fusion=False``, ``div_rn``, ``sqrt_rn``,
round-half-even through ``(v + 1.5 * 2**23) - 1.5 * 2**23``, exact for the code ranges here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..formats import QuantFormat, get_format
from ._kq_common import byte_blocks, fp16_bytes, q45_encode, q45_scales, quantize_rows
from ._search import f32
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
    def _q45_kernel(x_ptr, out_ptr, cand_ptr, S, NMAX: tl.constexpr, NSTEP: tl.constexpr, FIVE: tl.constexpr,
                    TYPE_SIZE: tl.constexpr, BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)
        sb = pid * BLOCK_S + tl.arange(0, BLOCK_S)
        j = tl.arange(0, 8)
        ok = sb < S
        mask = ok[:, None] & (j[None, :] < 8)
        base = x_ptr + sb.to(tl.int64)[:, None] * 256 + j[None, :] * 32
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
        # pass 2: weights w = |x| + av, sum_w, sum_x = sum(w * x)
        sum_w = zero
        sum_x = zero
        for i in range(32):
            xi = tl.load(base + i, mask=mask, other=0.0)
            w = tl.abs(xi) + av
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
            w = tl.abs(xi) + av
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
                w = tl.abs(xi) + av
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
                w = tl.abs(xi) + av
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
        # super-block scales: 6-bit sub-block scales and mins against the largest of each
        max_scale = tl.max(scale, axis=1)
        max_scale = tl.where(max_scale > 0, max_scale, 0.0)
        max_min = tl.max(the_min, axis=1)
        max_min = tl.where(max_min > 0, max_min, 0.0)
        one = tl.zeros([BLOCK_S], dtype=tl.float32) + 1.0
        inv_s = tl.where(max_scale > 0, tl.math.div_rn(one * 63.0, tl.where(max_scale > 0, max_scale, 1.0)), 0.0)
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

        CUDA tensors without an imatrix go to the Triton kernel (:meth:`quantize_triton`, same bytes)."""
        if imatrix is None and weight.is_cuda and HAVE_TRITON:
            return self.quantize_triton(weight)
        return quantize_rows(weight, imatrix, self.fmt, self._encode)

    def quantize_triton(self, weight: torch.Tensor) -> torch.Tensor:
        """The no-imatrix quantization of :meth:`quantize` as one Triton kernel (CUDA, or CPU under
        ``TRITON_INTERPRET=1``): ``(rows, n)`` float -> ``(rows, n/256*type_size)`` uint8, the reference's bytes."""
        fmt = self.fmt
        x, out, S = triton_io(weight, fmt, lambda r: quantize_rows(r, None, fmt, self._encode))
        if S == 0:
            return out
        nstep = self.ref_search[2]
        nmax = 31 if self.five_bit else 15
        cand = self._candidates(x.device)
        grid = (triton.cdiv(S, BLOCK_S),)
        _q45_kernel[grid](x, out, cand, S, NMAX=nmax, NSTEP=nstep, FIVE=self.five_bit, TYPE_SIZE=fmt.type_size,
                          BLOCK_S=BLOCK_S, num_warps=4, enable_fp_fusion=False)
        return out

    def _candidates(self, device: torch.device) -> torch.Tensor:
        """The search's code ranges ``rmin + rdelta * k + nmax`` (float32), on ``device``."""
        rmin, rdelta, nstep = self.ref_search
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
