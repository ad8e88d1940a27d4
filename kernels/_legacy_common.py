"""Shared pieces of the legacy codecs (Q4_0, Q4_1, Q5_0, Q5_1) and the IQ4 codecs (pure PyTorch, any device).

ggml's quantizers are scalar C loops: float32 arithmetic, sums accumulated left to right, no FMA contraction
(the ``libggml-base`` that llama-cpp-python ships has none). The helpers here reproduce those roundings where a
decision depends on them, so that our bytes match llama.cpp's block for block:

* sums that feed a search use ``_search.seqsum`` (left-to-right float32 adds; ``torch.sum`` is pairwise);
* divisions by constants go through :func:`fdiv` / ``_search.cdiv`` (exact on CUDA too);
* ``int8_t(v + 8.5f)`` style truncations are computed as separate float32 ops, then truncated.

Work runs position-major: a batch of 32-weight blocks is held as ``(32, n_blocks)`` so that the loop over the
positions of a block is a loop over contiguous rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import UnsupportedFormat
from ._blocks import as_byte_blocks, bytes_to_f16, f16_to_bytes
from ._search import cdiv, f32, qkx_search_t, qx_search_t, seqsum
from ._triton import HAVE_TRITON, check_launchable, tl, triton

#: Elements per chunk of rows quantized at once (temporaries stay cache-sized on CPU, launches few on CUDA).
CHUNK_ELEMS = {"cpu": 1 << 17, "cuda": 1 << 24}


def fdiv(t: torch.Tensor, c: float) -> torch.Tensor:
    """``t / c`` as an exact IEEE division (CUDA divides by a Python scalar through its reciprocal)."""
    return t / torch.full_like(t, c)


def sqrt_f32(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C ``sqrtf``).

    PyTorch's vectorized CPU ``sqrt`` for float32 is off by one ulp for about 17% of inputs; the float64 square
    root rounded to float32 is exact (53 >= 2*24 + 2 bits), so CPU tensors go through float64. CUDA's is exact.
    """
    if t.device.type == "cuda":
        return torch.sqrt(t)
    return torch.sqrt(t.to(torch.float64)).to(torch.float32)


def signed_absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The element of largest magnitude along ``dim``, keeping its sign; the first one wins ties (as C's ``>``)."""
    return x.gather(dim, x.abs().argmax(dim=dim, keepdim=True)).squeeze(dim)


def row_chunks(weight: torch.Tensor, block_size: int) -> Iterator[tuple[int, int]]:
    """Validate a ``(rows, n_per_row)`` weight and yield ``(start, stop)`` row ranges of bounded size."""
    if weight.dim() != 2:
        raise UnsupportedFormat(f"expected a 2-D weight (rows, n_per_row), got shape {tuple(weight.shape)}")
    rows, n = weight.shape
    if n == 0 or n % block_size:
        raise UnsupportedFormat(
            f"row length {n} is not a positive multiple of the block size {block_size}; pad the rows or pick another format"
        )
    step = max(1, CHUNK_ELEMS.get(weight.device.type, CHUNK_ELEMS["cuda"]) // n)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def check_imatrix(imatrix: torch.Tensor | None, n_per_row: int, device: torch.device) -> torch.Tensor | None:
    """Return the imatrix as float32 ``(n_per_row,)`` on ``device``, or raise when its length does not fit."""
    if imatrix is None:
        return None
    if imatrix.dim() != 1 or imatrix.shape[0] != n_per_row:
        raise UnsupportedFormat(
            f"imatrix must be 1-D with one value per column ({n_per_row}), got shape {tuple(imatrix.shape)}"
        )
    return imatrix.to(device=device, dtype=torch.float32)


def quantize_rows(
    weight: torch.Tensor,
    imatrix: torch.Tensor | None,
    block_size: int,
    type_size: int,
    encode: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    """Run ``encode(x_chunk, imatrix)`` -> ``(chunk_rows * blocks_per_row, type_size)`` uint8 over row chunks.

    ``x_chunk`` is the float32 ``(chunk_rows, n_per_row)`` slice; the result is ``(rows, n/bs*ts)`` bytes.
    """
    chunks = list(row_chunks(weight, block_size))
    rows, n = weight.shape
    qw = check_imatrix(imatrix, n, weight.device)
    out = torch.empty((rows, n // block_size * type_size), dtype=torch.uint8, device=weight.device)
    for start, stop in chunks:
        x = weight[start:stop].to(torch.float32)
        out[start:stop] = encode(x, qw).reshape(stop - start, -1)
    return out


def legacy_weights(x: torch.Tensor, qw: torch.Tensor, block_size: int) -> torch.Tensor:
    """Importance weights of the legacy ``_impl`` quantizers, ``qw * sqrt(sigma2 + x^2)``, ``sigma2`` the row mean of x^2.

    ``x``: float32 ``(rows, n)``; ``qw``: ``(n,)``. Returns ``(rows * n / block_size, block_size)``.
    """
    rows, n = x.shape
    x2 = x * x
    sigma2 = fdiv(seqsum(x2.t().contiguous()), float(n))
    w = qw[None, :] * sqrt_f32(sigma2[:, None] + x2)
    return w.reshape(-1, block_size)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes ``(n_blocks, 32)`` (only the low 4 bits used) -> ``(n_blocks, 16)`` bytes: element ``j`` low, ``j+16`` high."""
    q = q.to(torch.uint8)
    return (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes ``(n_blocks, 16)`` -> codes ``(n_blocks, 32)`` uint8, the inverse of :func:`pack_nibbles`."""
    return torch.cat([qs & 15, qs >> 4], dim=1)


def _bit_weights(device: torch.device) -> torch.Tensor:
    return (1 << torch.arange(8, device=device, dtype=torch.int32)).reshape(1, 1, 8)


def pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """5-bit codes ``(n_blocks, 32)`` -> ``qh`` ``(n_blocks, 4)`` bytes: bit 4 of element ``j`` is bit ``j`` of the LE u32."""
    h = ((q.to(torch.int32) >> 4) & 1).reshape(-1, 4, 8)
    return (h * _bit_weights(q.device)).sum(dim=2).to(torch.uint8)


def unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """``qh`` ``(n_blocks, 4)`` bytes -> ``(n_blocks, 32)`` uint8 values 0/16 (bit 4 of each element's code)."""
    bits = (qh.to(torch.int32)[:, :, None] >> torch.arange(8, device=qh.device, dtype=torch.int32)) & 1
    return (bits.reshape(-1, 32) << 4).to(torch.uint8)


def unpack_legacy(data: torch.Tensor, type_size: int, has_min: bool, five_bit: bool):
    """Split packed legacy blocks into ``(d, m, q)``: float32 ``(n_blocks, 1)`` scales/mins (``m`` None without
    a min) and uint8 codes ``(n_blocks, 32)`` (0..15 or 0..31)."""
    b = as_byte_blocks(data, type_size)
    d = bytes_to_f16(b[:, 0:2])
    off = 2
    m = None
    if has_min:
        m = bytes_to_f16(b[:, 2:4])
        off = 4
    q = unpack_nibbles(b[:, off + 4 * five_bit:])
    if five_bit:
        q = q | unpack_high_bits(b[:, off:off + 4])
    return d, m, q


def pack_legacy(d: torch.Tensor, m: torch.Tensor | None, q: torch.Tensor, five_bit: bool) -> torch.Tensor:
    """Inverse of :func:`unpack_legacy`: ``d``/``m`` float ``(n_blocks,)`` (rounded to fp16 here), codes ``(n_blocks, 32)``."""
    parts = [f16_to_bytes(d.reshape(-1, 1))]
    if m is not None:
        parts.append(f16_to_bytes(m.reshape(-1, 1)))
    if five_bit:
        parts.append(pack_high_bits(q))
    parts.append(pack_nibbles(q))
    return torch.cat(parts, dim=1)


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


def encode_ref(x: torch.Tensor, spec: LegacySpec) -> torch.Tensor:
    """ggml's ``quantize_row_q{4,5}_{0,1}_ref`` on float32 blocks ``(n_blocks, 32)`` -> packed ``(n_blocks, type_size)``."""
    if spec.has_min:
        mn = x.gather(1, x.argmin(dim=1, keepdim=True)).squeeze(1)
        mx = x.gather(1, x.argmax(dim=1, keepdim=True)).squeeze(1)
        d = fdiv(mx - mn, float(spec.top))
        inv = torch.where(d != 0, cdiv(1.0, d), 0.0)
        v = (x - mn[:, None]).mul_(inv[:, None]).add_(0.5)
    else:
        # ggml starts the running max at +0.0, so an all-zero block gets max = +0.0 and d = -0.0.
        mx = signed_absmax(x, 1) + 0.0
        d = fdiv(mx, -float(spec.half))
        inv = torch.where(d != 0, cdiv(1.0, d), 0.0)
        v = (x * inv[:, None]).add_(spec.half + 0.5)
        mn = None
    q = v.to(torch.int32)
    if spec.clamp_ref:
        q.clamp_(max=spec.top)
    return pack_legacy(d, mn, q, spec.bits == 5)


def encode_imatrix(x: torch.Tensor, qw: torch.Tensor, spec: LegacySpec) -> torch.Tensor:
    """ggml's ``quantize_row_q{4,5}_{0,1}_impl`` on float32 rows ``(rows, n)`` with imatrix ``qw`` ``(n,)``.

    Weights ``qw * sqrt(sigma2 + x^2)`` (``sigma2`` = row mean of x^2); symmetric types search with
    ``make_qx_quants(32, 2**(bits-1))``, asymmetric ones with ``make_qkx3_quants(32, 2**bits-1, -0.9, 0.05, 36)``.
    The codes of the search are stored as they are (no second pass with the fp16 scale).
    """
    xt = x.reshape(-1, 32).t().contiguous()
    wt = legacy_weights(x, qw, 32).t().contiguous()
    if spec.has_min:
        d, the_min, L = qkx_search_t(xt, wt, spec.top, f32(-0.9), f32(0.05), 36, False, strict_flat=False)
        m = (-the_min) + 0.0
    else:
        d, L = qx_search_t(xt, spec.half, wt)
        m = None
    return pack_legacy(d, m, L.t(), spec.bits == 5)


def quantize_legacy(weight: torch.Tensor, imatrix: torch.Tensor | None, spec: LegacySpec, type_size: int) -> torch.Tensor:
    """The codec ``quantize`` of a legacy type: ref path without an imatrix, ``_impl`` path with one."""
    if imatrix is None:
        return quantize_rows(weight, None, 32, type_size, lambda x, _: encode_ref(x.reshape(-1, 32), spec))
    return quantize_rows(weight, imatrix, 32, type_size, lambda x, qw: encode_imatrix(x, qw, spec))


def dequantize_legacy(data: torch.Tensor, spec: LegacySpec, type_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The codec ``dequantize`` of a legacy type (reference): ``(rows, nbytes)`` uint8 -> ``(rows, n)``."""
    d, m, q = unpack_legacy(data, type_size, spec.has_min, spec.bits == 5)
    if spec.has_min:
        y = d * q.to(torch.float32) + m
    else:
        y = d * (q.to(torch.int32) - spec.half).to(torch.float32)
    return y.to(dtype).reshape(data.shape[0], -1)


def launch_dequant(kernel, data: torch.Tensor, block_size: int, type_size: int, dtype: torch.dtype, blocks_per_program: int) -> torch.Tensor:
    """Run a ``kernel(src, dst, n_blocks, BLOCKS=...)`` dequantize kernel over ``(rows, nbytes)`` uint8 ``data``.

    FMA contraction is turned off so ``d * q + m`` rounds twice, as the C, gguf-py and PyTorch references do.
    """
    check_launchable(data.device.type)
    b = as_byte_blocks(data, type_size).contiguous()
    n_blocks = b.shape[0]
    out = torch.empty((n_blocks, block_size), dtype=dtype, device=data.device)
    if n_blocks:
        grid = (triton.cdiv(n_blocks, blocks_per_program),)
        kernel[grid](b, out, n_blocks, BLOCKS=blocks_per_program, enable_fp_fusion=False)
    return out.reshape(data.shape[0], -1)


if HAVE_TRITON:

    @triton.jit
    def load_f16(ptr, mask):
        """Read the little-endian fp16 at byte pointers ``ptr`` as float32 (0 where ``mask`` is off)."""
        lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def dequant_legacy_blocks(src, blk, mask, TS: tl.constexpr, HAS_MIN: tl.constexpr, FIVE_BIT: tl.constexpr):
        """Float32 tile ``[len(blk), 32]`` of legacy blocks ``blk`` (layout ``d, [m], [qh], qs``; see module doc)."""
        base = blk.to(tl.int64) * TS
        d = load_f16(src + base, mask)
        e = tl.arange(0, 32)
        qs = tl.load(src + base[:, None] + (2 + 2 * HAS_MIN + 4 * FIVE_BIT) + (e % 16)[None, :], mask=mask[:, None], other=0)
        q = (qs.to(tl.int32) >> ((e // 16) * 4)[None, :]) & 15
        if FIVE_BIT:
            qh = tl.load(src + base[:, None] + (2 + 2 * HAS_MIN) + (e // 8)[None, :], mask=mask[:, None], other=0)
            q = q | (((qh.to(tl.int32) >> (e % 8)[None, :]) & 1) << 4)
        if HAS_MIN:
            m = load_f16(src + base + 2, mask)
            y = d[:, None] * q.to(tl.float32) + m[:, None]
        else:
            y = d[:, None] * (q - (8 << FIVE_BIT)).to(tl.float32)
        return y

    @triton.jit
    def store_tile(dst, blk, mask, y, QKB: tl.constexpr):
        """Store the float32 tile ``y`` ``[len(blk), QKB]`` as rows ``blk`` of ``dst`` (rounding to nearest even)."""
        j = tl.arange(0, QKB)
        ptr = dst + blk.to(tl.int64)[:, None] * QKB + j[None, :]
        tl.store(ptr, y.to(dst.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask[:, None])
