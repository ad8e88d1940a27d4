"""Q8_0: blocks of 32 weights, ``d: f16`` then ``qs: int8[32]`` (34 bytes, 8.5 bpw); ``y = d * q``.

Reference codec (PyTorch, any device); the Triton dequantize goes through the registry tile (:mod:`.tiles`).
The imatrix is accepted and ignored, as in llama.cpp (Q8_0 has no search to weight).

CUDA tensors are quantized by one Triton kernel (:func:`quantize_triton`) with the reference's bytes: each program
takes ``BLOCK_B`` blocks as a ``(BLOCK_B, 32)`` tile; ``d = amax / 127`` and ``1 / d`` are true divisions
(``div_rn``), ``x * (1 / d)`` one rounded product (``enable_fp_fusion=False``), and C's ``roundf`` (half away
from zero) is ``floor(|v|)`` plus one where the exact fraction ``|v| - floor(|v|)`` is at least one half.
"""

from __future__ import annotations

import functools

import torch

from ..formats import get_format
from . import _cpu_fast, tiles
from ._blocks import as_blocks, as_byte_blocks, bytes_to_f16, f16_to_bytes, roundf, rows_out
from ._triton import HAVE_TRITON, tl, triton

FMT = get_format("q8_0")
QK = FMT.block_size
BLOCK_B = 64
"""Blocks per Triton program (a (64, 32) tile: 8 KB of weights)."""

if HAVE_TRITON:
    from .k45 import store_f16

    @triton.jit(do_not_specialize=["B"])  # one compile for every tensor shape
    def _q8_0_kernel(x_ptr, out_ptr, B, BLOCK_B: tl.constexpr):
        b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        j = tl.arange(0, 32)
        ok = b < B
        mask = ok[:, None] & (j[None, :] < 32)
        x = tl.load(x_ptr + b.to(tl.int64)[:, None] * 32 + j[None, :], mask=mask, other=0.0)
        amax = tl.max(tl.abs(x), axis=1)
        d = tl.math.div_rn(amax, tl.zeros_like(amax) + 127.0)
        inv = tl.where(d == 0, 0.0, tl.math.div_rn(tl.zeros_like(d) + 1.0, tl.where(d == 0, 1.0, d)))
        v = x * inv[:, None]
        a = tl.abs(v)
        f = tl.floor(a)
        a = f + tl.where(a - f >= 0.5, 1.0, 0.0)
        q = tl.where(v < 0, -a, a).to(tl.int32)
        out = out_ptr + b.to(tl.int64) * 34
        store_f16(out, d, ok)
        tl.store(out[:, None] + 2 + j[None, :], (q & 255).to(tl.uint8), mask=mask)


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/32*34)`` uint8, as ``quantize_row_q8_0_ref``.

    CPU tensors go to the C kernel of :mod:`._cpu_fast` (same bytes) unless ``QUANTFORGE_CPU_KERNELS=torch``;
    CUDA tensors to the Triton kernel (:func:`quantize_triton`, same bytes).
    """
    if weight.is_cuda and HAVE_TRITON:
        return quantize_triton(weight)
    if _cpu_fast.enabled(weight):
        as_blocks(weight[:1], QK)
        return _cpu_fast.quantize("q8_0", weight)
    return quantize_reference(weight)


def quantize_reference(weight: torch.Tensor) -> torch.Tensor:
    """The PyTorch codec (any device) that :func:`quantize`'s other paths reproduce byte for byte."""
    x = as_blocks(weight, QK)
    amax = x.abs().amax(dim=1, keepdim=True)
    d = amax / torch.full_like(amax, 127.0)  # a true division: CUDA divides by a scalar through its reciprocal
    inv = torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)
    q = roundf(x * inv).to(torch.int8)
    out = torch.cat([f16_to_bytes(d), q.view(torch.uint8)], dim=1)
    return rows_out(out, weight.shape[0])


def quantize_triton(weight: torch.Tensor) -> torch.Tensor:
    """:func:`quantize` as one Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``): ``(rows, n)`` float ->
    ``(rows, n/32*34)`` uint8, the reference's bytes."""
    from .k45 import triton_io

    x, out, B = triton_io(weight, FMT, lambda r: as_blocks(r, QK))
    if B:
        _q8_0_kernel[(triton.cdiv(B, BLOCK_B),)](x, out, B, BLOCK_B=BLOCK_B, num_warps=4, enable_fp_fusion=False)
    return out


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = as_byte_blocks(data, FMT.type_size)
    d = bytes_to_f16(b[:, :2])
    q = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return (d * q).to(dtype).reshape(data.shape[0], -1)


dequantize_triton = functools.partial(tiles.dequantize, FMT)
"""Triton dequantize through the registry tile (:mod:`.tiles`), same values as :func:`dequantize`."""
