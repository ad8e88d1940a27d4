"""Q8_0: blocks of 32 weights, ``d: f16`` then ``qs: int8[32]`` (34 bytes, 8.5 bpw); ``y = d * q``.

Reference codec (PyTorch, any device); the Triton dequantize goes through the registry tile (:mod:`.tiles`).
The imatrix is accepted and ignored, as in llama.cpp (Q8_0 has no search to weight).
"""

from __future__ import annotations

import functools

import torch

from ..formats import get_format
from . import _cpu_fast, tiles
from ._blocks import as_blocks, as_byte_blocks, bytes_to_f16, f16_to_bytes, roundf, rows_out

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
    amax = x.abs().amax(dim=1, keepdim=True)
    d = amax / torch.full_like(amax, 127.0)  # a true division: CUDA divides by a scalar through its reciprocal
    inv = torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)
    q = roundf(x * inv).to(torch.int8)
    out = torch.cat([f16_to_bytes(d), q.view(torch.uint8)], dim=1)
    return rows_out(out, weight.shape[0])


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = as_byte_blocks(data, FMT.type_size)
    d = bytes_to_f16(b[:, :2])
    q = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return (d * q).to(dtype).reshape(data.shape[0], -1)


dequantize_triton = functools.partial(tiles.dequantize, FMT)
"""Triton dequantize through the registry tile (:mod:`.tiles`), same values as :func:`dequantize`."""
