"""The ternary types TQ1_0 and TQ2_0 (BitNet b1.58 / TriLM weights): super-blocks of 256 weights, each weight
``d * t`` with a trit ``t`` in {-1, 0, 1} and one fp16 scale ``d`` per super-block.

| type | block layout (bytes) | bpw |
| --- | --- | --- |
| TQ1_0 | ``qs[48], qh[4], d: f16`` (54) | 1.6875 |
| TQ2_0 | ``qs[64], d: f16`` (66) | 2.0625 |

TQ1_0 packs 5 trits per byte as a base-3 fraction: the trits ``t0..t4`` (stored as ``t + 1`` in 0..2, ``t0`` the
most significant) form ``v = sum (t_n + 1) * 3^(4-n)`` (0..242), stored as ``ceil(v * 256 / 243)``; trit ``n`` comes
back as ``((byte * 3^n) mod 256) * 3 >> 8``. Element order inside a super-block: elements ``0..159`` are trit
``n = e // 32`` of ``qs[e % 32]``; ``160..239`` are trit ``n = (e - 160) // 16`` of ``qs[32 + (e - 160) % 16]``;
``240..255`` are trit ``n = (e - 240) // 4`` of ``qh[(e - 240) % 4]`` (4 trits per byte, the fifth always 0).

TQ2_0 stores ``t + 1`` in 2 bits: element ``e`` sits in byte ``32 * (e // 128) + e % 32`` at bit
``2 * ((e % 128) // 32)``.

``quantize`` is ggml's ``quantize_row_tq1_0_ref`` / ``quantize_row_tq2_0_ref`` (the imatrix is accepted and
ignored, as there): ``d = max |x|`` over the super-block, ``t = lroundf(x * (1 / d))`` (half away from zero, in
float32), ``d`` stored as fp16. Where ``x * (1 / d)`` is not finite (a subnormal maximum, an infinite weight) the
trit is 0, as glibc's ``lroundf`` makes it there. ``y = t * d`` on the way back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import QuantFormat, get_format
from ._blocks import as_byte_blocks, bytes_to_f16
from ._legacy_common import put_f16, quantize_rows
from ._triton import HAVE_TRITON, tl, triton

QK = 256
POW3 = (1, 3, 9, 27, 81)


def trits(x: torch.Tensor) -> torch.Tensor:
    """Super-blocks ``(B, 256)`` float32 -> ``(trits + 1)`` int64 ``(B, 256)`` in 0..2 and the float32 ``d`` ``(B,)``.

    ``lroundf`` is half away from zero; ``x - trunc(x)`` is exact in float32, so the tie test is too."""
    amax = x.abs().amax(dim=1)
    inv = torch.where(amax != 0, torch.full_like(amax, 1.0) / torch.where(amax != 0, amax, 1.0), 0.0)
    v = x * inv[:, None]
    r = torch.trunc(v)
    r = r + torch.where((v - r).abs() >= 0.5, torch.sign(v), 0.0)
    r = torch.where(torch.isfinite(v), r, 0.0)
    return r.to(torch.int64) + 1, amax


def _pack5(t: torch.Tensor, width: int) -> torch.Tensor:
    """Trit groups ``(B, 5, width)`` (``t0`` first) -> bytes ``(B, width)`` = ``ceil(v * 256 / 243)``."""
    v = torch.zeros_like(t[:, 0])
    for n in range(t.shape[1]):
        v = v * 3 + t[:, n]
    return (v * 256 + 242) // 243


def _encode_tq1(x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor) -> None:
    """Float32 rows -> TQ1_0 super-blocks ``out`` ``(n_blocks, 54)``."""
    t, d = trits(x.reshape(-1, QK))
    nb = t.shape[0]
    out[:, :32] = _pack5(t[:, :160].reshape(nb, 5, 32), 32).to(torch.uint8)
    out[:, 32:48] = _pack5(t[:, 160:240].reshape(nb, 5, 16), 16).to(torch.uint8)
    tail = torch.cat([t[:, 240:].reshape(nb, 4, 4), torch.zeros_like(t[:, :4]).reshape(nb, 1, 4)], dim=1)
    out[:, 48:52] = _pack5(tail, 4).to(torch.uint8)
    put_f16(out, 52, d)


def _encode_tq2(x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor) -> None:
    """Float32 rows -> TQ2_0 super-blocks ``out`` ``(n_blocks, 66)``."""
    t, d = trits(x.reshape(-1, QK))
    g = t.reshape(-1, 2, 4, 32)  # (block, half, shift slot n, byte m)
    shifts = (2 * torch.arange(4, device=x.device))[None, None, :, None]
    out[:, :64] = (g << shifts).sum(dim=2).reshape(-1, 64).to(torch.uint8)
    put_f16(out, 64, d)


def _decode5(b: torch.Tensor, n_trits: int) -> torch.Tensor:
    """Bytes ``(B, w)`` -> trits + 1 ``(B, n_trits, w)`` (trit ``n`` = ``((b * 3^n) mod 256) * 3 >> 8``)."""
    p = torch.tensor(POW3[:n_trits], dtype=torch.int32, device=b.device)[None, :, None]
    return (((b.to(torch.int32)[:, None, :] * p) & 255) * 3) >> 8


def _dequant_tq1(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    t = torch.cat([_decode5(b[:, :32], 5).reshape(nb, 160), _decode5(b[:, 32:48], 5).reshape(nb, 80),
                   _decode5(b[:, 48:52], 4).reshape(nb, 16)], dim=1)
    return (t - 1).to(torch.float32) * bytes_to_f16(b[:, 52:54])


def _dequant_tq2(b: torch.Tensor) -> torch.Tensor:
    q = b[:, :64].to(torch.int32).reshape(-1, 2, 1, 32)
    t = (q >> (2 * torch.arange(4, device=b.device, dtype=torch.int32))[None, None, :, None]) & 3
    return (t.reshape(-1, QK) - 1).to(torch.float32) * bytes_to_f16(b[:, 64:66])


@dataclass(frozen=True)
class TernaryCodec:
    """The registry codec of TQ1_0 or TQ2_0 (:mod:`quantforge.formats` contract)."""

    name: str

    @property
    def fmt(self) -> QuantFormat:
        return get_format(self.name)

    def quantize(self, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        """``(rows, n)`` float -> ``(rows, n/256*type_size)`` uint8, as ggml's ref quantizer (imatrix ignored,
        but checked for its shape like every codec)."""
        encode = _encode_tq1 if self.name == "tq1_0" else _encode_tq2
        return quantize_rows(weight, imatrix, QK, self.fmt.type_size, encode, path="ref")

    def dequantize(self, data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
        b = as_byte_blocks(data, self.fmt.type_size)
        y = _dequant_tq1(b) if self.name == "tq1_0" else _dequant_tq2(b)
        return y.to(dtype).reshape(data.shape[0], -1)

    def dequantize_triton(self, data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Triton dequantize through the registry tile (:mod:`.tiles`), same values as :meth:`dequantize`."""
        from . import tiles

        return tiles.dequantize(self.fmt, data, dtype)


TQ1_0 = TernaryCodec("tq1_0")
TQ2_0 = TernaryCodec("tq2_0")


if HAVE_TRITON:

    @triton.jit
    def _f16_at(src, off, mask):
        lo = tl.load(src + off, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(src + off + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def tq1_0_tile(src, aux, row, col, stride, mask):
        """TQ1_0 tile (signature of :mod:`.tiles`): trit ``n`` of byte ``off``, times ``d``."""
        base = row.to(tl.int64) * stride + (col // 256).to(tl.int64) * 54
        e = (col % 256).to(tl.int32)
        r = e - 160
        s = e - 240
        off = tl.where(e < 160, e % 32, tl.where(e < 240, 32 + r % 16, 48 + s % 4))
        n = tl.where(e < 160, e // 32, tl.where(e < 240, r // 16, s // 4))
        p = tl.where(n == 0, 1, tl.where(n == 1, 3, tl.where(n == 2, 9, tl.where(n == 3, 27, 81))))
        b = tl.load(src + base + off, mask=mask, other=0).to(tl.int32)
        t = (((b * p) & 255) * 3) >> 8
        return (t - 1).to(tl.float32) * _f16_at(src, base + 52, mask)

    @triton.jit
    def tq2_0_tile(src, aux, row, col, stride, mask):
        """TQ2_0 tile (signature of :mod:`.tiles`): 2-bit field ``(e % 128) // 32`` of byte ``32 * (e // 128) +
        e % 32``, minus 1, times ``d``."""
        base = row.to(tl.int64) * stride + (col // 256).to(tl.int64) * 66
        e = (col % 256).to(tl.int32)
        b = tl.load(src + base + 32 * (e // 128) + e % 32, mask=mask, other=0).to(tl.int32)
        t = (b >> (2 * ((e % 128) // 32))) & 3
        return (t - 1).to(tl.float32) * _f16_at(src, base + 64, mask)
