"""Byte-level helpers shared by the GGUF codecs (pure PyTorch, any device).

Layouts are little-endian, as GGUF stores them; every helper works on whole batches of blocks at once.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedFormat


def as_blocks(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows * n / block_size, block_size)`` float32 blocks (row-major)."""
    if weight.dim() != 2:
        raise UnsupportedFormat(f"expected a 2-D weight (rows, n_per_row), got shape {tuple(weight.shape)}")
    if weight.shape[1] % block_size:
        raise UnsupportedFormat(f"row length {weight.shape[1]} is not a multiple of the block size {block_size}")
    return weight.to(torch.float32).reshape(-1, block_size)


def as_byte_blocks(data: torch.Tensor, type_size: int) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(n_blocks, type_size)`` uint8."""
    if data.dtype != torch.uint8 or data.shape[-1] % type_size:
        raise UnsupportedFormat(
            f"expected uint8 rows of whole {type_size}-byte blocks, got {data.dtype} {tuple(data.shape)}")
    return data.reshape(-1, type_size)


def f16_to_bytes(x: torch.Tensor) -> torch.Tensor:
    """float tensor ``(n, ...)`` -> its IEEE fp16 bytes ``(n, 2*...)`` (round to nearest even)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(x.shape[0], -1)


def bytes_to_f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``(n, 2k)`` -> float32 ``(n, k)`` read as little-endian fp16."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def f32_to_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous().view(torch.uint8).reshape(x.shape[0], -1)


def bytes_to_f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def rows_out(blocks: torch.Tensor, rows: int) -> torch.Tensor:
    """Reshape packed ``(n_blocks, type_size)`` back to ``(rows, nbytes)``."""
    return blocks.reshape(rows, -1)


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: half away from zero (``torch.round`` is half to even, i.e. ggml's ``nearest_int``).

    Ties are found exactly (``x - trunc(x)`` is exact in float32); ``floor(|x| + 0.5)`` would round 0.49999997 up,
    since that sum rounds to 1.0."""
    t = torch.trunc(x)
    return torch.where((x - t).abs() == 0.5, t + torch.sign(x), torch.round(x))
