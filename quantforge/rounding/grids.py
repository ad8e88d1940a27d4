"""Where each GGUF type keeps its codes, so rounding can choose them itself while the type's own search keeps
choosing the scales.

A :class:`CodeGrid` knows, for one type, the value every stored code stands for (``y = s * values[code] + o``
within a block, with ``s``/``o`` set by the block's scales and minimums), how to write codes into packed blocks
without touching the scales, and where the block's float16 super-scales (``d``, ``dmin``) live. Everything
else (``s`` and ``o`` per weight) is read back through the type's own dequantizer (:func:`affine`), so no scale
layout is restated here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UnsupportedFormat
from ..formats import QuantFormat, get_format

Packer = Callable[[torch.Tensor, torch.Tensor], None]
"""``pack(blocks, codes)``: write stored codes ``(R, block)`` into packed blocks ``(R, type_size)`` (int32, in
place)."""

IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class CodeGrid:
    """One type's codes: ``values[c]`` is what stored code ``c`` multiplies (ascending), ``pack`` writes codes,
    ``d_at`` / ``dmin_at`` are the byte offsets of the float16 super-scale and min-scale (``None``: none)."""

    fmt: QuantFormat
    values: tuple[float, ...]
    pack: Packer
    d_at: int
    dmin_at: int | None = None

    @property
    def flat(self) -> bool:
        """One scale (and min) per block and nothing else: ``y = d * values[code] (+ m)`` (the 32-weight types)."""
        return self.fmt.block_size == 32

    @property
    def uniform(self) -> bool:
        """Consecutive integers: the nearest code is a rounding, not a search."""
        return all(b - a == 1 for a, b in zip(self.values[:-1], self.values[1:], strict=True))

    def values_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.values, dtype=torch.float32, device=device)


def _nibbles_split(codes: torch.Tensor) -> torch.Tensor:
    """32-weight blocks: element ``j`` in the low nibble of byte ``j``, element ``j + 16`` in the high one."""
    c = codes.reshape(codes.shape[0], -1, 32)
    return ((c[:, :, :16] & 15) | ((c[:, :, 16:] & 15) << 4)).reshape(codes.shape[0], -1)


def _bits_u32(codes: torch.Tensor, bit: int) -> torch.Tensor:
    """Bit ``bit`` of 32 codes as a little-endian u32 (4 bytes): byte ``k`` holds elements ``8k .. 8k+7``."""
    b = ((codes >> bit) & 1).reshape(codes.shape[0], 4, 8)
    return (b << torch.arange(8, dtype=torch.int32, device=codes.device)).sum(dim=2, dtype=torch.int32)


def _crumbs(codes: torch.Tensor) -> torch.Tensor:
    """2-bit codes of 256 weights: byte ``32h + l`` holds element ``128h + 32c + l`` at bits ``2c``."""
    q = codes.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _k45_low(codes: torch.Tensor) -> torch.Tensor:
    """Low nibbles of Q4_K/Q5_K: ``qs[32c + l]`` holds element ``64c + l`` (low) and ``64c + 32 + l`` (high)."""
    q = (codes & 15).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _pack_q2_k(b: torch.Tensor, L: torch.Tensor) -> None:
    b[:, 16:80] = _crumbs(L)


def _pack_q3_k(b: torch.Tensor, L: torch.Tensor) -> None:
    shifts = torch.arange(8, dtype=torch.int32, device=L.device).view(1, 8, 1)
    b[:, 0:32] = ((L >> 2).reshape(-1, 8, 32) << shifts).sum(dim=1, dtype=torch.int32)
    b[:, 32:96] = _crumbs(L & 3)


def _pack_q4_k(b: torch.Tensor, L: torch.Tensor) -> None:
    b[:, 16:144] = _k45_low(L)


def _pack_q5_k(b: torch.Tensor, L: torch.Tensor) -> None:
    shifts = torch.arange(8, dtype=torch.int32, device=L.device).view(1, 8, 1)
    b[:, 16:48] = ((L >> 4).reshape(-1, 8, 32) << shifts).sum(dim=1, dtype=torch.int32)
    b[:, 48:176] = _k45_low(L)


def _pack_q6_k(b: torch.Tensor, L: torch.Tensor) -> None:
    q = L.reshape(-1, 2, 4, 32)
    lo, hi = q & 15, q >> 4
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2)
    b[:, 0:128] = ql.reshape(-1, 128)
    b[:, 128:192] = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)


def _legacy(qs_at: int, qh_at: int | None) -> Packer:
    def pack(b: torch.Tensor, L: torch.Tensor) -> None:
        if qh_at is not None:
            b[:, qh_at:qh_at + 4] = _bits_u32(L, 4)
        b[:, qs_at:qs_at + 16] = _nibbles_split(L)

    return pack


def _pack_q8_0(b: torch.Tensor, L: torch.Tensor) -> None:
    b[:, 2:34] = (L - 127) & 255


def _pack_iq4_xs(b: torch.Tensor, L: torch.Tensor) -> None:
    b[:, 8:136] = _nibbles_split(L)


def _ints(lo: int, hi: int) -> tuple[float, ...]:
    return tuple(float(v) for v in range(lo, hi + 1))


_GRIDS: dict[str, tuple[tuple[float, ...], Packer, int, int | None]] = {
    "q2_k": (_ints(0, 3), _pack_q2_k, 80, 82),
    "q3_k": (_ints(-4, 3), _pack_q3_k, 108, None),
    "q4_k": (_ints(0, 15), _pack_q4_k, 0, 2),
    "q5_k": (_ints(0, 31), _pack_q5_k, 0, 2),
    "q6_k": (_ints(-32, 31), _pack_q6_k, 208, None),
    "q8_0": (_ints(-127, 127), _pack_q8_0, 0, None),
    "q4_0": (_ints(-8, 7), _legacy(2, None), 0, None),
    "q4_1": (_ints(0, 15), _legacy(4, None), 0, 2),
    "q5_0": (_ints(-16, 15), _legacy(6, 2), 0, None),
    "q5_1": (_ints(0, 31), _legacy(8, 4), 0, 2),
    "iq4_nl": (tuple(float(v) for v in IQ4_VALUES), _legacy(2, None), 0, None),
    "iq4_xs": (tuple(float(v) for v in IQ4_VALUES), _pack_iq4_xs, 0, None),
}
"""Code values, packer and super-scale offsets per type (GGUF.md §1). Q8_0 uses -127..127, as llama.cpp writes
it (some dot-product kernels take -128 badly); stored code ``c`` is value ``values[c]`` in every type. In the
32-weight types ``dmin_at`` is the added minimum ``m`` (``y = d * q + m``)."""

SUPPORTED = tuple(_GRIDS)


def grid_for(name: str) -> CodeGrid:
    """The :class:`CodeGrid` of type ``name``; types whose codes are lattice indices (IQ1-IQ3, rounded per
    super-block by :mod:`.lattice` instead) are refused."""
    if name not in _GRIDS:
        raise UnsupportedFormat(f"optimized rounding supports {', '.join(SUPPORTED)}; not {name}")
    values, pack, d_at, dmin_at = _GRIDS[name]
    return CodeGrid(get_format(name), values, pack, d_at, dmin_at)


def with_codes(grid: CodeGrid, blocks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Packed blocks ``(R, type_size)`` uint8 with their codes replaced by ``codes`` ``(R, block)`` (stored codes)."""
    b = blocks.to(torch.int32)
    grid.pack(b, codes.to(torch.int32))
    return b.to(torch.uint8)


def get_f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte ``at`` of every block ``(R, type_size)`` uint8, as float32 ``(R,)``."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def set_f16(blocks: torch.Tensor, at: int, v: torch.Tensor) -> torch.Tensor:
    """A copy of ``blocks`` with ``v`` ``(R,)`` written as float16 at byte ``at``."""
    out = blocks.clone()
    out[:, at:at + 2] = v.to(torch.float16).view(torch.uint8).reshape(-1, 2)
    return out


def affine(grid: CodeGrid, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per weight ``(s, o)`` ``(R, block)`` with ``y = s * values[code] + o`` under the blocks' scales: read from
    the float16 fields in the 32-weight types (exact), else back through the type's dequantizer with every code
    set to the two grid values around zero."""
    R, n = blocks.shape[0], grid.fmt.block_size
    if grid.flat:
        d = get_f16(blocks, grid.d_at)[:, None].expand(R, n)
        m = get_f16(blocks, grid.dmin_at)[:, None].expand(R, n) if grid.dmin_at is not None else torch.zeros_like(d)
        return d, m
    vals = grid.values
    i0 = min(range(len(vals) - 1), key=lambda i: abs(vals[i]))
    y = []
    for i in (i0, i0 + 1):
        codes = torch.full((R, n), i, dtype=torch.int32, device=blocks.device)
        y.append(grid.fmt.dequantize(with_codes(grid, blocks, codes)))
    s = (y[1] - y[0]) / (vals[i0 + 1] - vals[i0])
    o = y[0] - s * vals[i0] if vals[i0] != 0 else y[0]
    return s, o
