"""IQ4_NL: blocks of 32 weights, ``d: f16`` then ``qs[16]`` (18 bytes, 4.5 bpw); ``y = d * KVALUES_IQ4NL[q]``.

Nibble order as Q4_0 (element ``j`` low, ``j + 16`` high). ``quantize`` is llama.cpp's ``quantize_iq4_nl``
(``quantize_row_iq4_nl_impl`` with ``ntry = 7``, super-block = block = 32; see :mod:`._iq4_common`), with or
without an imatrix.
"""

from __future__ import annotations

import functools

import torch

from ..errors import InputError
from ..formats import get_format
from . import tiles
from ._blocks import as_byte_blocks, bytes_to_f16
from ._iq4_common import best_index, block_scales, grid_values, importance
from ._legacy_common import position_major, put_f16, put_nibbles, quantize_rows, unpack_nibbles
from ._search import cdiv

FMT = get_format("iq4_nl")
QK = FMT.block_size


def _encode(x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor) -> None:
    """Float32 rows ``(rows, n)`` -> packed blocks ``out`` ``(rows * n / 32, 18)``."""
    xt = position_major(x)
    d = block_scales(xt, importance(x, xt, qw, QK))
    if not bool(torch.isfinite(d).all()):
        raise InputError(
            "IQ4_NL scale search gave a non-finite block scale (non-finite weights, or an imatrix that is zero over "
            "a whole 32-column block, where llama.cpp stores NaN and fails validation); give every column a "
            "positive imatrix value or quantize without the imatrix"
        )
    inv = torch.where(d != 0, cdiv(1.0, d), 0.0)
    put_f16(out, 0, d)
    put_nibbles(out, 2, best_index(xt * inv).t())


def quantize(weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float -> ``(rows, n/32*18)`` uint8; ``imatrix`` ``(n,)`` weights the scale search."""
    return quantize_rows(weight, imatrix, QK, FMT.type_size, _encode, fast="iq4_nl")


def dequantize(data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
    b = as_byte_blocks(data, FMT.type_size)
    d = bytes_to_f16(b[:, :2])
    y = d * grid_values(unpack_nibbles(b[:, 2:]))
    return y.to(dtype).reshape(data.shape[0], -1)


dequantize_triton = functools.partial(tiles.dequantize, FMT)
"""Triton dequantize through the registry tile (:mod:`.tiles`), same values as :func:`dequantize`."""
