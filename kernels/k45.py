"""Q4_K and Q5_K: super-blocks of 256 weights in 8 sub-blocks of 32, which differ only in a fifth code bit.

* Q4_K (144 bytes, 4.5 bpw): ``d: f16, dmin: f16, scales[12], qs[128]``;
* Q5_K (176 bytes, 5.5 bpw): ``d: f16, dmin: f16, scales[12], qh[32], qs[128]``.

Sub-block ``j`` has a 6-bit scale ``sc_j`` and min ``m_j`` (packed as in GGUF.md §1); ``y = d*sc_j*q - dmin*m_j``.
``qs[32c + l]`` holds the low four bits of element ``64c + l`` in its low nibble and of ``64c + 32 + l`` in its high
nibble; in Q5_K bit 4 of element ``32j + l`` is bit ``j`` of ``qh[l]``.

Quantization follows ``quantize_row_q{4,5}_K_ref`` without an imatrix and ``quantize_row_q{4,5}_K_impl`` with one
(GGUF.md §2.2), vectorized over all super-blocks (:mod:`._kq_common`, :mod:`._search`); the Triton dequantize goes
through the registry tiles (:mod:`.tiles`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import QuantFormat, get_format
from ._kq_common import byte_blocks, fp16_bytes, q45_encode, q45_scales, quantize_rows


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
        """``(rows, n)`` float -> ``(rows, n/256*type_size)`` uint8, as ggml (ref path without imatrix)."""
        return quantize_rows(weight, imatrix, self.fmt, self._encode)

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
