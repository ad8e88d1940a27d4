"""Q8_0: blocks of 32 weights, ``d: f16`` then ``qs: int8[32]`` (34 bytes, 8.5 bpw); ``y = d * q``.

Reference codec (PyTorch, any device) and a Triton dequantize kernel checked against it. The imatrix is
accepted and ignored, as in llama.cpp (Q8_0 has no search to weight).
"""

from __future__ import annotations

import torch

from ..formats import get_format
from . import _cpu_fast
from ._blocks import as_blocks, as_byte_blocks, bytes_to_f16, f16_to_bytes, roundf, rows_out
from ._triton import HAVE_TRITON, check_launchable, tl, triton

FMT = get_format("q8_0")
QK = FMT.block_size


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/32*34)`` uint8, as ``quantize_row_q8_0_ref``.

    CPU tensors go to the C kernel of :mod:`._cpu_fast` (same bytes) unless ``QUANTFORGE_CPU_KERNELS=torch``.
    """
    if _cpu_fast.enabled(weight):
        as_blocks(weight[:1], QK)
        return _cpu_fast.quantize("q8_0", weight)
    x = as_blocks(weight, QK)
    d = x.abs().amax(dim=1, keepdim=True) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = roundf(x * inv).to(torch.int8)
    out = torch.cat([f16_to_bytes(d), q.view(torch.uint8)], dim=1)
    return rows_out(out, weight.shape[0])


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = as_byte_blocks(data, FMT.type_size)
    d = bytes_to_f16(b[:, :2])
    q = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return (d * q).to(dtype).reshape(data.shape[0], -1)


if HAVE_TRITON:

    @triton.jit
    def dequant_q8_0_blocks(src, blk, mask, QKB: tl.constexpr):
        """Dequantize the Q8_0 blocks with indices ``blk`` (1-D) to a float32 tile ``[len(blk), 32]``.

        A fused matmul calls this tile by tile; ``src`` points at the packed bytes.
        """
        base = blk * 34
        lo = tl.load(src + base, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(src + base + 1, mask=mask, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        j = tl.arange(0, QKB)
        q = tl.load(src + base[:, None] + 2 + j[None, :], mask=mask[:, None], other=0).to(tl.int8, bitcast=True)
        return d[:, None] * q.to(tl.float32)

    @triton.jit
    def dequant_q8_0_kernel(src, dst, n_blocks, BLOCKS: tl.constexpr, QKB: tl.constexpr):
        pid = tl.program_id(0)
        blk = pid * BLOCKS + tl.arange(0, BLOCKS)
        mask = blk < n_blocks
        y = dequant_q8_0_blocks(src, blk, mask, QKB)
        j = tl.arange(0, QKB)
        tl.store(dst + blk[:, None] * QKB + j[None, :], y.to(dst.dtype.element_ty, fp_downcast_rounding="rtne"),
                 mask=mask[:, None])


def dequantize_triton(data: torch.Tensor, dtype: torch.dtype = torch.float32,
                      blocks_per_program: int = 64) -> torch.Tensor:
    """Triton dequantize, same result as :func:`dequantize`."""
    check_launchable(data.device.type)
    b = as_byte_blocks(data, FMT.type_size).contiguous()
    n_blocks = b.shape[0]
    out = torch.empty((n_blocks, QK), dtype=dtype, device=data.device)
    grid = (triton.cdiv(n_blocks, blocks_per_program),)
    dequant_q8_0_kernel[grid](b, out, n_blocks, BLOCKS=blocks_per_program, QKB=QK)
    return out.reshape(data.shape[0], -1)
