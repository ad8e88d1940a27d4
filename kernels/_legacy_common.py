"""Shared pieces of the legacy codecs (Q4_0, Q4_1, Q5_0, Q5_1), also used by the IQ4 codecs (PyTorch, any device).

ggml's quantizers are scalar C loops: float32 arithmetic, sums accumulated left to right, no FMA contraction
(the ``libggml-base`` that llama-cpp-python ships has none). The helpers here reproduce those roundings where a
decision depends on them, so that our bytes match llama.cpp's block for block:

* sums that feed a search are left-to-right float32 sums (:func:`seqsum_cols`; ``torch.sum`` is pairwise);
* square roots are correctly rounded (:func:`sqrt_f32`; PyTorch's CPU float32 ``sqrt`` is not);
* divisions by constants go through :func:`fdiv` / ``_search.cdiv`` (exact on CUDA too);
* ``int8_t(v + 8.5f)`` style truncations are computed as separate float32 ops, then truncated.

Searches run position-major: a batch of 32-weight blocks is held as ``(32, n_blocks)`` (as in :mod:`._search`),
so the loop over the positions of a block is a loop over contiguous rows. Block layouts: ``d: f16``, then
``m: f16`` for the types with a min, then ``qh[4]`` (bit 4 of each 5-bit code, little-endian u32) for the 5-bit
types, then ``qs[16]`` (element ``j`` in the low nibble of byte ``j``, element ``j + 16`` in its high nibble).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UnsupportedFormat
from ..formats import QuantFormat, get_format
from . import _cpu_fast
from ._blocks import as_byte_blocks, bytes_to_f16
from ._search import cdiv, f32, qkx_search_t, qx_search_t, seqsum

#: Weights per chunk of rows quantized at once, by (device type, path). On CPU the searches keep temporaries of
#: 2^17 floats (512 KiB), which stay in cache and are reused by the allocator (larger fresh buffers cost page
#: faults on every op); the one-pass ref paths take larger chunks to spend less on Python. On CUDA, few launches.
CHUNK_ELEMS = {("cpu", "search"): 1 << 17, ("cpu", "ref"): 1 << 19}
CHUNK_ELEMS_OTHER = 1 << 26

Encoder = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], None]


def fdiv(t: torch.Tensor, c: float) -> torch.Tensor:
    """``t / c`` as an exact IEEE division (CUDA divides by a Python scalar through its reciprocal)."""
    return t / torch.full_like(t, c)


def sqrt_f32(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C ``sqrtf``).

    PyTorch's vectorized CPU ``sqrt`` for float32 is off by one ulp for about 17% of inputs (and slower than
    NumPy's, which uses the exact hardware instruction), so CPU tensors go through NumPy. CUDA's is exact.
    """
    if t.device.type != "cpu":
        return torch.sqrt(t)
    return torch.from_numpy(np.sqrt(t.contiguous().numpy()))


def seqsum_cols(t: torch.Tensor) -> torch.Tensor:
    """Left-to-right float32 sum over dim 0 of a 2-D ``(n, G)`` tensor, as ``_search.seqsum`` computes it.

    On CPU with ``G >= 2`` NumPy's reduction over the outer axis of a C-contiguous array does the same adds in
    the same order (row by row into one accumulator per column) in one call; a test checks the equality.
    With ``G == 1`` NumPy would reduce along a contiguous run, pairwise, so that case keeps the loop.
    """
    if t.device.type == "cpu" and t.dim() == 2 and t.shape[1] >= 2:
        return torch.from_numpy(np.add.reduce(t.contiguous().numpy(), axis=0))
    return seqsum(t)


def signed_absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The element of largest magnitude along ``dim``, keeping its sign; the first one wins ties (as C's ``>``).

    ``argmax`` over short rows is slow in PyTorch, so the answer comes from ``amax``/``amin``; only groups where
    ``max == -min`` (both signs reach the magnitude, or all zeros) need the position of the first one.
    """
    lo, hi = torch.aminmax(x, dim=dim)
    out = torch.where(hi >= -lo, hi, lo)
    return _first_where(out, hi == -lo, x, dim, lambda g: g.abs().argmax(dim=-1, keepdim=True))


def first_min(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.amin(dim)``, except that a zero minimum keeps the sign of its first occurrence (C's ``<`` loop)."""
    out = x.amin(dim=dim)
    return _first_where(out, out == 0, x, dim, lambda g: g.argmin(dim=-1, keepdim=True))


def first_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.amax(dim)``, except that a zero maximum keeps the sign of its first occurrence (C's ``>`` loop)."""
    out = x.amax(dim=dim)
    return _first_where(out, out == 0, x, dim, lambda g: g.argmax(dim=-1, keepdim=True))


def _first_where(out: torch.Tensor, redo: torch.Tensor, x: torch.Tensor, dim: int, pick) -> torch.Tensor:
    """Replace ``out`` where ``redo`` by the element of ``x`` (along ``dim``) at ``pick(groups)`` (first occurrence)."""
    if bool(redo.any()):
        groups = x.movedim(dim, -1)[redo]
        out = out.masked_scatter(redo, groups.gather(-1, pick(groups)).squeeze(-1))
    return out


def quantize_rows(
    weight: torch.Tensor,
    imatrix: torch.Tensor | None,
    block_size: int,
    type_size: int,
    encode: Encoder,
    path: str = "search",
    fast: str | None = None,
) -> torch.Tensor:
    """Validate ``weight`` ``(rows, n)`` and ``imatrix`` ``(n,)``, then fill ``(rows, n/bs*ts)`` bytes chunk by chunk.

    ``encode(x, qw, out)`` gets float32 rows ``x`` ``(chunk_rows, n)``, the float32 imatrix (or None) and the
    uint8 view ``out`` ``(chunk_rows * n / block_size, type_size)`` of those rows' blocks, which it fills.
    ``path`` ("search" or "ref") picks the chunk size from :data:`CHUNK_ELEMS`. ``fast`` names the type for the
    C CPU kernels of :mod:`._cpu_fast` (same bytes), used for CPU tensors unless
    ``QUANTFORGE_CPU_KERNELS=torch``; ``encode`` is then the reference.
    """
    if weight.dim() != 2:
        raise UnsupportedFormat(f"expected a 2-D weight (rows, n_per_row), got shape {tuple(weight.shape)}")
    rows, n = weight.shape
    if n == 0 or n % block_size:
        raise UnsupportedFormat(
            f"row length {n} is not a positive multiple of the block size {block_size}; "
            "pad the rows or pick a format with smaller blocks"
        )
    qw = None
    if imatrix is not None:
        if imatrix.dim() != 1 or imatrix.shape[0] != n:
            raise UnsupportedFormat(
                f"imatrix must be 1-D with one value per column ({n}), got shape {tuple(imatrix.shape)}"
            )
        qw = imatrix.to(device=weight.device, dtype=torch.float32).contiguous()
    if fast is not None and _cpu_fast.enabled(weight):
        return _cpu_fast.quantize(fast, weight, qw)
    out = torch.empty((rows, n // block_size * type_size), dtype=torch.uint8, device=weight.device)
    step = max(1, CHUNK_ELEMS.get((weight.device.type, path), CHUNK_ELEMS_OTHER) // n)
    # Whole multiples of 32 blocks per chunk where possible (``_search.seqsum`` pads other widths).
    align = 32 // math.gcd(n // 32, 32)
    if step > align:
        step -= step % align
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        encode(weight[start:stop].to(torch.float32), qw, out[start:stop].view(-1, type_size))
    return out


def position_major(x: torch.Tensor) -> torch.Tensor:
    """Float32 rows ``(rows, n)`` -> ``(32, rows * n / 32)``: column ``b`` is block ``b`` in row-major block order."""
    return x.reshape(-1, 32).t().contiguous()


def importance_weights(
    xt: torch.Tensor, qw: torch.Tensor, rows: int, group: int, sigma2_of: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``qw * sqrt(sigma2 + x^2)`` for position-major weights ``xt`` ``(32, rows * n / 32)``.

    ``qw``: imatrix ``(n,)``. ``sigma2 = sigma2_of(Σx²)`` per run of ``group`` consecutive weights of a row (the
    whole row for the legacy types, the super-block for IQ4), the sum taken left to right as ggml does.
    """
    nb = qw.shape[0] // 32
    k = group // 32
    x2 = xt * xt
    runs = x2 if k == 1 else x2.reshape(32, -1, k).permute(2, 0, 1).reshape(group, -1)
    sigma2 = sigma2_of(seqsum_cols(runs))
    v = x2.reshape(32, rows, nb // k, k).add_(sigma2.reshape(1, rows, nb // k, 1))
    w = sqrt_f32(v).reshape(32, rows, nb // k, k)
    return w.mul_(qw.reshape(nb, 32).t().reshape(32, 1, nb // k, k)).reshape(32, -1)


def put_f16(out: torch.Tensor, col: int, v: torch.Tensor) -> None:
    """Write ``v`` ``(n_blocks,)`` as little-endian fp16 (round to nearest even) to bytes ``col, col+1`` of ``out``."""
    out[:, col : col + 2] = v.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def put_nibbles(out: torch.Tensor, col: int, codes: torch.Tensor) -> None:
    """Write codes ``(..., 32)`` uint8 (< 16) as ``qs[16]`` at byte ``col`` of ``out`` ``(..., bytes)``: element ``j``
    in the low nibble of byte ``j``, element ``j + 16`` in its high nibble."""
    torch.bitwise_or(codes[..., :16], codes[..., 16:] << 4, out=out[..., col : col + 16])


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes ``(n_blocks, 16)`` -> codes ``(n_blocks, 32)`` uint8, the inverse of :func:`put_nibbles`."""
    return torch.cat([qs & 15, qs >> 4], dim=1)


def put_high_bits(out: torch.Tensor, col: int, codes: torch.Tensor) -> None:
    """Write bit 4 of codes ``(n_blocks, 32)`` uint8 as ``qh[4]`` at byte ``col`` (LE u32, bit ``j`` = element ``j``).

    Each run of 8 codes is read as one int64 with the bits at 0, 8, ..., 56 and folded to one byte by shifts.
    """
    v = ((codes >> 4) & 1).contiguous().view(torch.int64)
    v = v | (v >> 7)
    v = v | (v >> 14)
    v = v | (v >> 28)
    out[:, col : col + 4] = (v & 255).to(torch.uint8)


def unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """``qh`` ``(n_blocks, 4)`` bytes -> ``(n_blocks, 32)`` uint8 values 0/16 (bit 4 of each element's code)."""
    bits = (qh[:, :, None] >> torch.arange(8, device=qh.device, dtype=torch.uint8)) & 1
    return bits.reshape(-1, 32) << 4


@dataclass(frozen=True)
class LegacySpec:
    """What tells the four legacy types apart: code width (4 or 5 bits) and whether blocks carry a min.

    Symmetric types (Q4_0, Q5_0) dequantize as ``d * (q - 2**(bits-1))``, asymmetric ones (Q4_1, Q5_1) as
    ``d * q + m``. ``clamp_ref`` is the ``MIN(top, ...)`` the ref quantizer applies (Q5_1's has none).
    """

    bits: int
    has_min: bool
    clamp_ref: bool

    @property
    def top(self) -> int:
        return (1 << self.bits) - 1

    @property
    def half(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def qs_col(self) -> int:
        return 2 + 2 * self.has_min + 4 * (self.bits == 5)


def pack_legacy(
    out: torch.Tensor, spec: LegacySpec, d: torch.Tensor, m: torch.Tensor | None, codes: torch.Tensor
) -> None:
    """Fill blocks ``out`` ``(n_blocks, type_size)`` from ``d``/``m`` ``(n_blocks,)`` and codes ``(n_blocks, 32)``."""
    codes = codes.to(torch.uint8)
    put_f16(out, 0, d)
    if spec.has_min:
        put_f16(out, 2, m)
    if spec.bits == 5:
        put_high_bits(out, 2 + 2 * spec.has_min, codes)
        codes = codes & 15
    put_nibbles(out, spec.qs_col, codes)


def encode_ref(x: torch.Tensor, spec: LegacySpec, out: torch.Tensor) -> None:
    """ggml's ``quantize_row_q{4,5}_{0,1}_ref`` on float32 rows: the codes come from ``d`` in float32, truncated."""
    x = x.reshape(-1, 32)
    if spec.has_min:
        mn = first_min(x, 1)
        d = fdiv(first_max(x, 1) - mn, float(spec.top))
        inv = torch.where(d != 0, cdiv(1.0, d), 0.0)
        v = (x - mn[:, None]).mul_(inv[:, None]).add_(0.5)
    else:
        # ggml starts the running max at +0.0, so an all-zero block gets max = +0.0 and d = -0.0.
        d = fdiv(signed_absmax(x, 1) + 0.0, -float(spec.half))
        inv = torch.where(d != 0, cdiv(1.0, d), 0.0)
        v = (x * inv[:, None]).add_(spec.half + 0.5)
        mn = None
    q = v.to(torch.uint8)
    if spec.clamp_ref:
        q.clamp_(max=spec.top)
    pack_legacy(out, spec, d, mn, q)


def encode_imatrix(x: torch.Tensor, qw: torch.Tensor, spec: LegacySpec, out: torch.Tensor) -> None:
    """ggml's ``quantize_row_q{4,5}_{0,1}_impl`` on float32 rows ``(rows, n)`` with imatrix ``qw`` ``(n,)``.

    Weights ``qw * sqrt(sigma2 + x^2)`` (``sigma2`` = row mean of x^2); symmetric types search with
    ``make_qx_quants(32, 2**(bits-1))``, asymmetric ones with ``make_qkx3_quants(32, 2**bits-1, -0.9, 0.05, 36)``.
    The codes of the search are stored as they are (no second pass with the fp16 scale).
    """
    rows, n = x.shape
    xt = position_major(x)
    wt = importance_weights(xt, qw, rows, n, lambda s: fdiv(s, float(n)))
    if spec.has_min:
        d, the_min, L = qkx_search_t(xt, wt, spec.top, f32(-0.9), f32(0.05), 36, False, strict_flat=False)
        # ggml stores m = -the_min = its final min: +0.0 when that is zero, except in flat blocks (max <= min),
        # which keep the block's first minimum with its sign (an all-zero block starting with -0.0 has m = -0.0).
        lo = first_min(xt, 0)
        flat = xt.amax(dim=0) <= lo.clamp(max=0.0)
        m = torch.where(flat, lo, (-the_min) + 0.0)
    else:
        d, L = qx_search_t(xt, spec.half, wt)
        m = None
    pack_legacy(out, spec, d, m, L.t())


def quantize_legacy(
    weight: torch.Tensor, imatrix: torch.Tensor | None, spec: LegacySpec, type_size: int
) -> torch.Tensor:
    """The codec ``quantize`` of a legacy type: ref path without an imatrix, ``_impl`` path with one."""
    fast = f"q{spec.bits}_{int(spec.has_min)}"
    if imatrix is None:
        return quantize_rows(weight, None, 32, type_size, lambda x, _, out: encode_ref(x, spec, out), "ref", fast)
    return quantize_rows(weight, imatrix, 32, type_size, lambda x, qw, out: encode_imatrix(x, qw, spec, out),
                         fast=fast)


def dequantize_legacy(data: torch.Tensor, spec: LegacySpec, type_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The codec ``dequantize`` of a legacy type (reference): ``(rows, nbytes)`` uint8 -> ``(rows, n)``."""
    b = as_byte_blocks(data, type_size)
    d = bytes_to_f16(b[:, 0:2])
    q = unpack_nibbles(b[:, spec.qs_col :])
    if spec.bits == 5:
        q = q | unpack_high_bits(b[:, 2 + 2 * spec.has_min : spec.qs_col])
    if spec.has_min:
        y = d * q.to(torch.float32) + bytes_to_f16(b[:, 2:4])
    else:
        y = d * (q.to(torch.int32) - spec.half).to(torch.float32)
    return y.to(dtype).reshape(data.shape[0], -1)


@dataclass(frozen=True)
class LegacyCodec:
    """The registry codec of one legacy type (:mod:`quantforge.formats` contract), closed over its spec."""

    name: str
    spec: LegacySpec

    @property
    def fmt(self) -> QuantFormat:
        return get_format(self.name)

    def quantize(self, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        """``(rows, n)`` float -> ``(rows, n/32*type_size)`` uint8; ``imatrix`` ``(n,)`` selects the ``_impl`` path."""
        return quantize_legacy(weight, imatrix, self.spec, self.fmt.type_size)

    def dequantize(self, data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(rows, nbytes)`` uint8 -> ``(rows, n)`` (reference)."""
        return dequantize_legacy(data, self.spec, self.fmt.type_size, dtype)

    def dequantize_triton(self, data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Triton dequantize through the registry tile (:mod:`.tiles`), same values as :meth:`dequantize`."""
        from . import tiles

        return tiles.dequantize(self.fmt, data, dtype)
