"""Q6_K: super-blocks of 256 weights in 16 sub-blocks of 16 (210 bytes, 6.5625 bpw).

Layout: ``ql[128], qh[64], scales: int8[16], d: f16`` (``d`` last). Codes are 6-bit, stored ``+32``; half ``h``
(128 elements) uses ``ql[64h:64h+64]`` and ``qh[32h:32h+32]``: for ``l < 32`` element ``l`` is
``ql[l] & 15 | (qh[l] & 3) << 4``, ``l+32`` is ``ql[l+32] & 15 | (qh[l] >> 2 & 3) << 4``, ``l+64`` is
``ql[l] >> 4 | (qh[l] >> 4 & 3) << 4`` and ``l+96`` is ``ql[l+32] >> 4 | (qh[l] >> 6) << 4``.
``y = d * scales[e/16] * (q - 32)``.

Quantization follows ``quantize_row_q6_K_ref`` (weights ``x²``) and ``quantize_row_q6_K_impl`` (raw imatrix
weights, no σ² term) (GGUF.md §2.2), vectorized over all super-blocks.

CUDA tensors, with or without an imatrix, are quantized by one Triton kernel (:func:`quantize_triton`) with the
reference's bytes, in the manner of :mod:`.k45`: each program takes ``BLOCK_S`` super-blocks as a ``(BLOCK_S, 16)``
tile of sub-blocks and walks the 16 positions of a sub-block in order for each of ``make_qx_quants``' 19 candidate
scales, so every float32 sum is the reference's sequential sum; every operation rounds once
(``enable_fp_fusion=False``, ``div_rn``, round-half-even through :func:`.k45.rne`).
"""

from __future__ import annotations

import functools

import torch

from ..errors import UnsupportedFormat
from ..formats import get_format
from . import tiles
from ._kq_common import (
    byte_blocks,
    cdiv,
    fp16_bytes,
    fp16_from,
    fp16_round,
    from_groups,
    quantize_rows,
    requant_sym,
    to_groups,
)
from ._search import GROUP_MAX_EPS, f32, max_abs_signed, qx_search_t
from ._triton import HAVE_TRITON, tl, triton

FMT = get_format("q6_k")
QK = FMT.block_size
BLOCK_S = 32
"""Super-blocks per Triton program (a (32, 16) tile of sub-blocks, re-read from L1 by each candidate's pass)."""
CANDIDATES = tuple(f32(32 + f32(f32(0.1) * k)) for k in range(-9, 10) if k != 0)
"""``make_qx_quants``' candidate code ranges after the first (``nmax + 0.1f * is``, ``is = -9..9``, ``is != 0``)."""

if HAVE_TRITON:
    from .k45 import rne, store_f16

    @triton.jit
    def _qx_sums(base, wbase, mask, isc, HAS_QW: tl.constexpr):
        """``Σ w x l`` and ``Σ w l²`` of each sub-block, left to right, for codes ``clamp(nearest(isc x), -32, 31)``."""
        sumlx = tl.zeros_like(isc)
        suml2 = tl.zeros_like(isc)
        for i in range(16):
            xi = tl.load(base + i, mask=mask, other=0.0)
            if HAS_QW:
                w = tl.load(wbase + i, mask=mask, other=0.0)
            else:
                w = xi * xi
            lv = tl.minimum(tl.maximum(rne(isc * xi), -32.0), 31.0)
            sumlx = sumlx + (w * xi) * lv
            suml2 = suml2 + (w * lv) * lv
        return sumlx, suml2

    @triton.jit(do_not_specialize=["S", "SB_ROW"])  # one compile for every tensor shape
    def _q6_k_kernel(x_ptr, qw_ptr, cand_ptr, out_ptr, S, SB_ROW, HAS_QW: tl.constexpr, BLOCK_S: tl.constexpr):
        sb = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        j = tl.arange(0, 16)
        ok = sb < S
        mask = ok[:, None] & (j[None, :] < 16)
        base = x_ptr + sb.to(tl.int64)[:, None] * 256 + j[None, :] * 16
        wbase = qw_ptr + (sb % SB_ROW)[:, None] * 256 + j[None, :] * 16
        zero = tl.zeros([BLOCK_S, 16], dtype=tl.float32)
        # make_qx_quants(16, 32, ...): the signed value of largest magnitude (the first on ties)
        amax = zero
        mx = zero
        for i in range(16):
            xi = tl.load(base + i, mask=mask, other=0.0)
            up = tl.abs(xi) > amax
            amax = tl.where(up, tl.abs(xi), amax)
            mx = tl.where(up, xi, mx)
        dead = amax < 1e-15
        mx = tl.where(dead, 1.0, mx)
        iscale = tl.math.div_rn(zero - 32.0, mx)
        sumlx, suml2 = _qx_sums(base, wbase, mask, iscale, HAS_QW)
        scale = tl.where(suml2 != 0, tl.math.div_rn(sumlx, tl.where(suml2 != 0, suml2, 1.0)), 0.0)
        best = scale * sumlx
        best_iscale = iscale
        for k in range(18):
            isc = tl.math.div_rn(zero - tl.load(cand_ptr + k), mx)
            sumlx, suml2 = _qx_sums(base, wbase, mask, isc, HAS_QW)
            acc = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            new = tl.math.div_rn(sumlx, tl.where(acc, suml2, 1.0))
            scale = tl.where(acc, new, scale)
            best = tl.where(acc, new * sumlx, best)
            best_iscale = tl.where(acc, isc, best_iscale)
        scale = tl.where(dead, 0.0, scale)
        # super-block scale: the sub-block scale of largest magnitude (the first on ties) maps to -128
        mag = tl.abs(scale)
        top = tl.max(mag, axis=1)
        first = tl.min(tl.where(mag == top[:, None], j[None, :], 16), axis=1)
        max_scale = tl.sum(tl.where(j[None, :] == first[:, None], scale, 0.0), axis=1)
        empty = tl.abs(max_scale) < 1e-15
        one = tl.zeros([BLOCK_S], dtype=tl.float32) + 1.0
        inv = tl.math.div_rn(one * -128.0, tl.where(empty, 1.0, max_scale))
        d16 = tl.where(empty, 0.0, tl.math.div_rn(one, inv)).to(tl.float16).to(tl.float32)
        ls = tl.minimum(rne(scale * inv[:, None]), 127.0)
        dj = d16[:, None] * ls
        out = out_ptr + sb.to(tl.int64) * 210
        ls = tl.where(empty[:, None], 0.0, ls).to(tl.int32)
        tl.store(out[:, None] + 192 + j[None, :], (ls & 255).to(tl.uint8), mask=mask)
        store_f16(out + 208, d16, ok)
        # codes re-quantized with the stored scales (a zero scale keeps the search's), packed in place:
        # sub-block j = 8h + 2c + jl holds elements 128h + 32c + 16jl + i (i = 0..15)
        m8 = tl.arange(0, 8)
        m4 = tl.arange(0, 4)
        sh_lo = 4 * ((j >> 2) & 1)
        sh_hi = 2 * ((j >> 1) & 3)
        for i in range(16):
            xi = tl.load(base + i, mask=mask, other=0.0)
            L = tl.where(dead, 0.0, tl.minimum(tl.maximum(rne(best_iscale * xi), -32.0), 31.0) + 32.0)
            new = tl.minimum(tl.maximum(rne(tl.math.div_rn(xi, tl.where(dj != 0, dj, 1.0))), -32.0), 31.0) + 32.0
            q = tl.where(empty[:, None], 0.0, tl.where(dj != 0, new, L)).to(tl.int32)
            lo = tl.reshape(tl.sum(tl.reshape((q & 15) << sh_lo[None, :], [BLOCK_S, 2, 2, 4]), axis=2), [BLOCK_S, 8])
            hi = tl.reshape(tl.sum(tl.reshape((q >> 4) << sh_hi[None, :], [BLOCK_S, 2, 4, 2]), axis=2), [BLOCK_S, 4])
            tl.store(out[:, None] + 16 * m8[None, :] + i, lo.to(tl.uint8), mask=ok[:, None])
            tl.store(out[:, None] + 128 + 16 * m4[None, :] + i, hi.to(tl.uint8), mask=ok[:, None])


def _encode(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    S = x.shape[0]
    xs = to_groups(x, 16)
    scale, L = qx_search_t(xs, 32, None if qw is None else to_groups(qw, 16))
    sc = scale.view(S, 16)
    max_scale = max_abs_signed(sc, dim=1)
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = cdiv(-128.0, torch.where(zero, torch.ones_like(max_scale), max_scale))
    d = fp16_round(cdiv(1.0, iscale)).masked_fill_(zero, 0.0)
    ls = (sc * iscale[:, None]).round_().clamp_(max=127).to(torch.int32)
    dj = (d[:, None] * ls.to(torch.float32)).reshape(-1)
    L = from_groups(requant_sym(xs, L, dj, -32, 31), QK)
    L = L.masked_fill_(zero[:, None], 0)
    ls = ls.masked_fill_(zero[:, None], 0)
    q = L.reshape(-1, 2, 4, 32)
    lo, hi = q & 15, q >> 4
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2).reshape(-1, QK // 2)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, QK // 4)
    return torch.cat([ql, qh, ls & 255, fp16_bytes(d)], dim=1).to(torch.uint8)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/256*210)`` uint8, as ggml ``quantize_q6_K`` (ref path without imatrix).

    CUDA tensors go to the Triton kernel (:func:`quantize_triton`, same bytes)."""
    if weight.is_cuda and HAVE_TRITON:
        return quantize_triton(weight, imatrix)
    return quantize_reference(weight, imatrix)


def quantize_reference(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """The vectorized PyTorch codec (any device; the C kernels on CPU unless ``QUANTFORGE_CPU_KERNELS=torch``)
    that :func:`quantize_triton` reproduces byte for byte."""
    return quantize_rows(weight, imatrix, FMT, _encode)


def quantize_triton(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`quantize` as one Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``): ``(rows, n)`` float ->
    ``(rows, n/256*210)`` uint8, the reference's bytes with and without ``imatrix`` ``(n,)``."""
    from .k45 import device_constant, triton_io

    x, out, S = triton_io(weight, FMT, lambda r: quantize_rows(r, None, FMT, _encode))
    qw = x
    if imatrix is not None:
        if imatrix.dim() != 1 or imatrix.shape[0] != x.shape[1]:
            raise UnsupportedFormat(f"imatrix for q6_k must have one value per column ({x.shape[1]},), got shape "
                                    f"{tuple(imatrix.shape)}")
        qw = imatrix.to(device=x.device, dtype=torch.float32).contiguous()
    if S:
        cand = device_constant(CANDIDATES, x.device)
        _q6_k_kernel[(triton.cdiv(S, BLOCK_S),)](x, qw, cand, out, S, x.shape[1] // QK, HAS_QW=imatrix is not None,
                                                 BLOCK_S=BLOCK_S, num_warps=4, enable_fp_fusion=False)
    return out


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = byte_blocks(data, FMT)
    dev = b.device
    d = fp16_from(b[:, 208:210])
    sc = b[:, 192:208].to(torch.uint8).view(torch.int8).to(torch.float32)
    dl = (d[:, None] * sc).unsqueeze(-1)
    sh_l = torch.tensor([0, 4], dtype=torch.int32, device=dev).view(1, 1, 2, 1)
    sh_h = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=dev).view(1, 1, 4, 1)
    ql = (b[:, :128].reshape(-1, 2, 1, 64) >> sh_l) & 15
    qh = (b[:, 128:192].reshape(-1, 2, 1, 32) >> sh_h) & 3
    q = (ql.reshape(-1, 2, 4, 32) | (qh << 4)) - 32
    return (dl * q.reshape(-1, 16, 16).to(torch.float32)).reshape(data.shape[0], -1).to(dtype)


dequantize_triton = functools.partial(tiles.dequantize, FMT)
"""Triton dequantize through the registry tile (:mod:`.tiles`), same values as :func:`dequantize`."""
