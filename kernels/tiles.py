"""Tile dequantizers: one ``@triton.jit`` function per registry format, all with one signature.

Every format of :mod:`quantforge.formats` names its tile in ``QuantFormat.tile``
(``"quantforge.kernels.tiles:q4_k_tile"``); a matmul or merge kernel takes the tile as a ``tl.constexpr``
argument and is generic over the format::

    tile(src, aux, row, col, stride, mask) -> float32 tile

* ``src``: pointer to the weight's storage, rows one after another: the packed bytes (uint8) of the GGUF and
  bitsandbytes formats, the elements themselves for the float formats.
* ``aux``: pointer to a float32 side table (NF4/FP4: ``QuantWeight.extra["aux"]``, see :mod:`.qweight`);
  formats without one ignore it (pass any pointer, e.g. ``src``).
* ``row``: int64 row (output feature) indices, ``row`` and ``col`` broadcast to the tile shape, e.g.
  ``[R, 1]`` and ``[1, C]``; ``col``: int64 column (input feature) indices.
* ``stride``: int64 distance between rows, in bytes (elements for the float formats).
* ``mask``: bool, the tile shape; masked-off elements read nothing and come back as 0.

``src`` must be 16-byte aligned (``QuantWeight`` keeps its storage so): the Q4_K/Q5_K tiles read each block's 16
header bytes as two 64-bit words.

The tile is exactly the codec's ``dequantize`` in float32 wherever the calling kernel is compiled with
``enable_fp_fusion=False`` (``d * q - m`` rounds twice, as in the PyTorch references). Any (row, col) tile works:
tiles may straddle rows and quantization blocks; each element reads its own block header (cached loads).

:func:`dequantize` is the one standalone dequantize launcher every codec's ``dequantize_triton`` calls. NF4/FP4,
Q4_K, Q5_K and Q6_K go through whole-tensor kernels (each program decodes whole blocks: every byte read once, every
header and sub-block scale decoded once; ~3 TB/s on an H200 against 0.4-1.1 TB/s through the tiles), the same
float32 values as their tiles; the other formats through the generic tile kernel.
"""

from __future__ import annotations

import importlib

import torch

from ..errors import UnsupportedFormat
from ..formats import Family, QuantFormat, get_format
from ._iq4_common import KVALUES_IQ4NL
from ._triton import HAVE_TRITON, check_launchable, tl, triton

#: Element count of a standalone dequantize program: rows x columns.
DEQUANT_TILE = (16, 256)

if HAVE_TRITON:
    # The IQ4 grid packed into two int64 words of 8-bit fields (value + 127): field i of word i // 8.
    _KV_LO = tl.constexpr(sum((v + 127) << (8 * i) for i, v in enumerate(KVALUES_IQ4NL[:8])))
    _KV_HI = tl.constexpr(sum((v + 127) << (8 * i) for i, v in enumerate(KVALUES_IQ4NL[8:])) - (1 << 64))

    @triton.jit
    def _u8(src, off, mask):
        """Bytes at offsets ``off`` -> int32."""
        return tl.load(src + off, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _f16(src, off, mask):
        """The fp16 at byte offsets ``off`` (always even: every block size and field offset is) -> float32."""
        return tl.load((src + off).to(tl.pointer_type(tl.float16)), mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _f32(src, off, mask):
        """The float32 at byte offsets ``off`` (a multiple of 4)."""
        return tl.load((src + off).to(tl.pointer_type(tl.float32)), mask=mask, other=0.0)

    @triton.jit
    def _kvalue(idx):
        """``KVALUES_IQ4NL[idx]`` as float32 for int32 ``idx`` in 0..15."""
        word = tl.where(idx < 8, _KV_LO, _KV_HI)
        return (((word >> ((idx & 7) * 8).to(tl.int64)) & 255) - 127).to(tl.float32)

    @triton.jit
    def _block(row, col, stride, QK: tl.constexpr, TS: tl.constexpr):
        """Byte offset of the block holding (row, col), and the position of col inside it."""
        return row.to(tl.int64) * stride + (col // QK).to(tl.int64) * TS, (col % QK).to(tl.int32)

    @triton.jit
    def float_tile(src, aux, row, col, stride, mask):
        """f32 / f16 / bf16: the stored elements widened to float32."""
        return tl.load(src + row.to(tl.int64) * stride + col, mask=mask, other=0).to(tl.float32)

    @triton.jit
    def q8_0_tile(src, aux, row, col, stride, mask):
        """Q8_0: ``d: f16, qs: int8[32]``; ``y = d * q``."""
        base, e = _block(row, col, stride, 32, 34)
        q = tl.load(src + base + 2 + e, mask=mask, other=0).to(tl.int8, bitcast=True)
        return _f16(src, base, mask) * q.to(tl.float32)

    @triton.jit
    def _legacy(src, row, col, stride, mask, TS: tl.constexpr, HAS_MIN: tl.constexpr, FIVE_BIT: tl.constexpr):
        """Q4_0/Q4_1/Q5_0/Q5_1: ``d, [m], [qh[4]], qs[16]``; element ``e`` in nibble ``e // 16`` of ``qs[e % 16]``."""
        base, e = _block(row, col, stride, 32, TS)
        qs = _u8(src, base + (2 + 2 * HAS_MIN + 4 * FIVE_BIT) + e % 16, mask)
        q = (qs >> ((e // 16) * 4)) & 15
        if FIVE_BIT:
            q = q | (((_u8(src, base + (2 + 2 * HAS_MIN) + e // 8, mask) >> (e % 8)) & 1) << 4)
        d = _f16(src, base, mask)
        if HAS_MIN:
            y = d * q.to(tl.float32) + _f16(src, base + 2, mask)
        else:
            y = d * (q - (8 + 8 * FIVE_BIT)).to(tl.float32)
        return y

    @triton.jit
    def q4_0_tile(src, aux, row, col, stride, mask):
        """Q4_0: ``y = d * (q - 8)``."""
        return _legacy(src, row, col, stride, mask, 18, 0, 0)

    @triton.jit
    def q4_1_tile(src, aux, row, col, stride, mask):
        """Q4_1: ``y = d * q + m``."""
        return _legacy(src, row, col, stride, mask, 20, 1, 0)

    @triton.jit
    def q5_0_tile(src, aux, row, col, stride, mask):
        """Q5_0: ``y = d * (q - 16)``."""
        return _legacy(src, row, col, stride, mask, 22, 0, 1)

    @triton.jit
    def q5_1_tile(src, aux, row, col, stride, mask):
        """Q5_1: ``y = d * q + m``."""
        return _legacy(src, row, col, stride, mask, 24, 1, 1)

    @triton.jit
    def iq4_nl_tile(src, aux, row, col, stride, mask):
        """IQ4_NL: ``d: f16, qs[16]`` (nibbles as Q4_0); ``y = d * KVALUES_IQ4NL[q]``."""
        base, e = _block(row, col, stride, 32, 18)
        idx = (_u8(src, base + 2 + e % 16, mask) >> ((e // 16) * 4)) & 15
        return _f16(src, base, mask) * _kvalue(idx)

    @triton.jit
    def iq4_xs_tile(src, aux, row, col, stride, mask):
        """IQ4_XS: ``d: f16, scales_h: u16, scales_l[4], qs[128]``; ``y = d * (ls - 32) * KVALUES_IQ4NL[q]``."""
        base, e = _block(row, col, stride, 256, 136)
        ib = e // 32
        j = e % 32
        sh = _u8(src, base + 2, mask) | (_u8(src, base + 3, mask) << 8)
        ls = ((_u8(src, base + 4 + ib // 2, mask) >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
        dl = _f16(src, base, mask) * (ls - 32).to(tl.float32)
        idx = (_u8(src, base + 8 + 16 * ib + j % 16, mask) >> ((j // 16) * 4)) & 15
        return dl * _kvalue(idx)

    @triton.jit
    def q2_k_tile(src, aux, row, col, stride, mask):
        """Q2_K: ``scales[16], qs[64], d, dmin``; ``y = d * (sc & 15) * q - dmin * (sc >> 4)``."""
        base, e = _block(row, col, stride, 256, 84)
        sc = _u8(src, base + e // 16, mask)
        q = (_u8(src, base + 16 + (e // 128) * 32 + e % 32, mask) >> (((e % 128) // 32) * 2)) & 3
        d = _f16(src, base + 80, mask)
        dmin = _f16(src, base + 82, mask)
        return (d * (sc & 15).to(tl.float32)) * q.to(tl.float32) - dmin * (sc >> 4).to(tl.float32)

    @triton.jit
    def q3_k_tile(src, aux, row, col, stride, mask):
        """Q3_K: ``hmask[32], qs[64], scales[12], d``; ``y = d * (scale_j - 32) * q``, q in -4..3."""
        base, e = _block(row, col, stride, 256, 110)
        j = e // 16
        ln = e % 32
        lo_b = _u8(src, base + 96 + j % 8, mask)
        hi_b = _u8(src, base + 104 + j % 4, mask)
        sc = (((lo_b >> ((j // 8) * 4)) & 15) | (((hi_b >> (2 * (j // 4))) & 3) << 4)) - 32
        low = (_u8(src, base + 32 + (e // 128) * 32 + ln, mask) >> (((e % 128) // 32) * 2)) & 3
        q = low - ((((_u8(src, base + ln, mask) >> (e // 32)) & 1) ^ 1) << 2)
        return (_f16(src, base + 108, mask) * sc.to(tl.float32)) * q.to(tl.float32)

    @triton.jit
    def _scale_min_k4(src, sbase, j, mask):
        """Q4_K/Q5_K 6-bit ``(sc, m)`` of sub-block ``j`` from the 12 scale bytes at ``sbase``."""
        b_j = _u8(src, sbase + j, mask)
        b_j4 = _u8(src, sbase + j + 4, mask)
        b_jm4 = _u8(src, sbase + (j ^ 4), mask)
        sc = tl.where(j < 4, b_j & 63, (b_j4 & 15) | ((b_jm4 >> 6) << 4))
        m = tl.where(j < 4, b_j4 & 63, (b_j4 >> 4) | ((b_j >> 6) << 4))
        return sc, m

    @triton.jit
    def _u64(src, off, mask):
        """The int64 at byte offsets ``off`` (a multiple of 8)."""
        return tl.load((src + off).to(tl.pointer_type(tl.int64)), mask=mask, other=0)

    @triton.jit
    def _half(bits):
        """The fp16 in the low 16 bits of int32 ``bits`` -> float32."""
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _k45(src, row, col, stride, mask, TS: tl.constexpr, FIVE_BIT: tl.constexpr):
        """Q4_K/Q5_K: ``d, dmin, scales[12], [qh[32]], qs[128]``; ``y = d * sc_j * q - dmin * m_j``.

        The 16 header bytes come in as two 64-bit words (``d, dmin, scales[0:4]`` and ``scales[4:12]``; blocks
        start at multiples of 16 bytes), so an element issues three loads instead of six; sub-block ``j``'s 6-bit
        scale and min are then cut from bytes ``j % 4`` (low six bits, or the top two), ``j + 4`` and ``j`` as in
        :func:`_scale_min_k4`."""
        base, e = _block(row, col, stride, 256, TS)
        j = e // 32
        sh = (j & 3) * 8
        h0 = _u64(src, base, mask)
        h1 = _u64(src, base + 8, mask)
        s47 = h1.to(tl.int32)
        lo = ((h0 >> 32).to(tl.int32) >> sh) & 255
        hi = (tl.where(j < 4, s47, (h1 >> 32).to(tl.int32)) >> sh) & 255
        sc = tl.where(j < 4, lo & 63, (hi & 15) | ((lo >> 6) << 4))
        m = tl.where(j < 4, hi & 63, (hi >> 4) | ((((s47 >> sh) & 255) >> 6) << 4))
        q = (_u8(src, base + 16 + 32 * FIVE_BIT + (e // 64) * 32 + e % 32, mask) >> ((j % 2) * 4)) & 15
        if FIVE_BIT:
            q = q | (((_u8(src, base + 16 + e % 32, mask) >> j) & 1) << 4)
        head = h0.to(tl.int32)
        d = _half(head)
        dmin = _half(head >> 16)
        return (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * m.to(tl.float32)

    @triton.jit
    def q4_k_tile(src, aux, row, col, stride, mask):
        """Q4_K: 4-bit codes under 6-bit sub-block scales and mins."""
        return _k45(src, row, col, stride, mask, 144, 0)

    @triton.jit
    def q5_k_tile(src, aux, row, col, stride, mask):
        """Q5_K: Q4_K plus a fifth bit per code in ``qh``."""
        return _k45(src, row, col, stride, mask, 176, 1)

    @triton.jit
    def q6_k_tile(src, aux, row, col, stride, mask):
        """Q6_K: ``ql[128], qh[64], scales: int8[16], d``; ``y = d * scales[e / 16] * (q - 32)``."""
        base, e = _block(row, col, stride, 256, 210)
        h = e // 128
        c = (e % 128) // 32
        ln = e % 32
        sc = tl.load(src + base + 192 + e // 16, mask=mask, other=0).to(tl.int8, bitcast=True)
        ql = _u8(src, base + 64 * h + (c % 2) * 32 + ln, mask)
        qh = _u8(src, base + 128 + 32 * h + ln, mask)
        q = (((ql >> ((c // 2) * 4)) & 15) | (((qh >> (2 * c)) & 3) << 4)) - 32
        return (_f16(src, base + 208, mask) * sc.to(tl.float32)) * q.to(tl.float32)

    @triton.jit
    def bnb4_tile(src, aux, row, col, stride, mask):
        """NF4/FP4 (registry layout): 64-weight blocks of 32 code bytes (high nibble first) + float32 absmax;
        ``aux`` holds the 16 code values; ``y = code[q] * absmax``."""
        base, e = _block(row, col, stride, 64, 36)
        q = (_u8(src, base + e // 2, mask) >> (4 - 4 * (e % 2))) & 15
        return tl.load(aux + q, mask=mask, other=0.0) * _f32(src, base + 32, mask)

    @triton.jit
    def bnb4_dq_tile(src, aux, row, col, stride, mask):
        """Double-quantized NF4/FP4: 33-byte blocks (32 code bytes + the uint8 absmax code); ``aux`` =
        ``[code[16], nested_code[256], offset, nested_absmax[n_blocks / 256]]``;
        ``absmax = nested_code[a] * nested_absmax[block / 256] + offset``, ``y = code[q] * absmax``."""
        base, e = _block(row, col, stride, 64, 33)
        blk = row.to(tl.int64) * (stride // 33) + (col // 64).to(tl.int64)
        a = _u8(src, base + 32, mask)
        nested = tl.load(aux + 16 + 256 + 1 + blk // 256, mask=mask, other=0.0)
        absmax = tl.load(aux + 16 + a, mask=mask, other=0.0) * nested + tl.load(aux + 16 + 256)
        q = (_u8(src, base + e // 2, mask) >> (4 - 4 * (e % 2))) & 15
        return tl.load(aux + q, mask=mask, other=0.0) * absmax

    @triton.jit
    def dequant_kernel(src, aux, dst, n_rows, n_cols, stride, TILE: tl.constexpr, BR: tl.constexpr,
                       BC: tl.constexpr):
        """Dequantize a ``(n_rows, n_cols)`` weight into ``dst`` through ``TILE`` (round to nearest even)."""
        row = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)[:, None]
        col = (tl.program_id(1) * BC + tl.arange(0, BC)).to(tl.int64)[None, :]
        mask = (row < n_rows) & (col < n_cols)
        y = TILE(src, aux, row, col, stride, mask)
        tl.store(dst + row * n_cols + col, y.to(dst.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


    @triton.jit
    def _store_blocks(dst, blk, bm, y, NB: tl.constexpr, QK: tl.constexpr):
        """Store ``y`` (``[NB, ...]``, ``QK`` elements per block in output order) at the blocks ``blk`` of ``dst``."""
        e = tl.arange(0, QK).to(tl.int64)
        y2 = tl.reshape(y, (NB, QK))
        tl.store(dst + blk[:, None] * QK + e[None, :], y2.to(dst.dtype.element_ty, fp_downcast_rounding="rtne"),
                 mask=bm[:, None])

    @triton.jit
    def bnb4_blocks_kernel(src, aux, dst, n_blocks, DQ: tl.constexpr, NB: tl.constexpr):
        """Whole-tensor NF4/FP4 dequantize, ``NB`` 64-weight blocks per program: each code byte is read once and
        gives two elements, each block's absmax is decoded once. Same float32 values as :func:`bnb4_tile`."""
        blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
        bm = blk < n_blocks
        base = blk * (36 - 3 * DQ)
        j = tl.arange(0, 32)
        byte = tl.load(src + base[:, None, None] + j[None, :, None], mask=bm[:, None, None], other=0).to(tl.int32)
        if DQ:
            a = tl.load(src + base + 32, mask=bm, other=0).to(tl.int32)
            nested = tl.load(aux + 16 + 256 + 1 + blk // 256, mask=bm, other=0.0)
            absmax = tl.load(aux + 16 + a, mask=bm, other=0.0) * nested + tl.load(aux + 16 + 256)
        else:
            absmax = _f32(src, base + 32, bm)
        nib = tl.arange(0, 2)[None, None, :]
        q = (byte >> (4 - 4 * nib)) & 15
        y = tl.load(aux + q) * absmax[:, None, None]
        _store_blocks(dst, blk, bm, y, NB, 64)

    @triton.jit
    def k45_blocks_kernel(src, aux, dst, n_blocks, FIVE_BIT: tl.constexpr, NB: tl.constexpr):
        """Whole-tensor Q4_K/Q5_K dequantize, ``NB`` super-blocks per program as ``[NB, 8 sub-blocks, 32]``: the
        sub-block scales and mins are decoded once per sub-block. Same float32 values as :func:`q4_k_tile`."""
        blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
        bm = blk < n_blocks
        base = blk * (144 + 32 * FIVE_BIT)
        jj = tl.arange(0, 8)[None, :]
        sc, m = _scale_min_k4(src, base[:, None] + 4, jj, bm[:, None])
        d = _f16(src, base, bm)[:, None, None]
        dmin = _f16(src, base + 2, bm)[:, None, None]
        j = jj[:, :, None]
        ln = tl.arange(0, 32)[None, None, :]
        b3 = base[:, None, None]
        m3 = bm[:, None, None]
        q = (_u8(src, b3 + 16 + 32 * FIVE_BIT + (j // 2) * 32 + ln, m3) >> ((j % 2) * 4)) & 15
        if FIVE_BIT:
            q = q | (((_u8(src, b3 + 16 + ln, m3) >> j) & 1) << 4)
        y = (d * sc[:, :, None].to(tl.float32)) * q.to(tl.float32) - dmin * m[:, :, None].to(tl.float32)
        _store_blocks(dst, blk, bm, y, NB, 256)

    @triton.jit
    def q6_k_blocks_kernel(src, aux, dst, n_blocks, NB: tl.constexpr):
        """Whole-tensor Q6_K dequantize, ``NB`` super-blocks per program as ``[NB, 16 scales, 16]``: each 16-weight
        group reads its scale once. Same float32 values as :func:`q6_k_tile`."""
        blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
        bm = blk < n_blocks
        base = blk * 210
        s = tl.arange(0, 16)[None, :]
        sc = tl.load(src + base[:, None] + 192 + s, mask=bm[:, None], other=0).to(tl.int8, bitcast=True)
        d = _f16(src, base + 208, bm)[:, None, None]
        s3 = s[:, :, None]
        h = s3 // 8
        c = (s3 // 2) % 4
        ln = (s3 % 2) * 16 + tl.arange(0, 16)[None, None, :]
        b3 = base[:, None, None]
        m3 = bm[:, None, None]
        ql = _u8(src, b3 + 64 * h + (c % 2) * 32 + ln, m3)
        qh = _u8(src, b3 + 128 + 32 * h + ln, m3)
        q = (((ql >> ((c // 2) * 4)) & 15) | (((qh >> (2 * c)) & 3) << 4)) - 32
        y = (d * sc[:, :, None].to(tl.float32)) * q.to(tl.float32)
        _store_blocks(dst, blk, bm, y, NB, 256)


#: Whole-tensor dequantize kernels (kernel, blocks per program, constexprs) of the formats a LoRA base is most
#: often held in; :func:`dequantize` sends the other formats through their tile (one element per lane, each
#: reading its own block header), which runs at a fraction of the memory bandwidth.
_BLOCK_KERNELS = {} if not HAVE_TRITON else {
    "bnb4": (bnb4_blocks_kernel, 64, {}),
    "q4_k": (k45_blocks_kernel, 16, {"FIVE_BIT": 0}),
    "q5_k": (k45_blocks_kernel, 16, {"FIVE_BIT": 1}),
    "q6_k": (q6_k_blocks_kernel, 16, {}),
}


def load_tile(fmt: QuantFormat, double_quant: bool = False):
    """The ``@triton.jit`` tile the registry names for ``fmt`` (the 33-byte-block NF4/FP4 tile when
    ``double_quant``)."""
    if fmt.tile is None:
        raise UnsupportedFormat(f"format {fmt.name} has no Triton tile")
    if double_quant:
        return bnb4_dq_tile
    module, _, attr = fmt.tile.partition(":")
    return getattr(importlib.import_module(module), attr)


def elements_per_row(fmt: QuantFormat, data: torch.Tensor, double_quant: bool = False) -> int:
    """Weights per row of ``data`` (packed rows, or float elements)."""
    if fmt.family is Family.FLOAT:
        return data.shape[-1]
    return data.shape[-1] // (33 if double_quant else fmt.type_size) * fmt.block_size


def default_aux(fmt: QuantFormat, device: torch.device) -> torch.Tensor | None:
    """The side table a registry-layout weight needs (the NF4/FP4 code values), else None."""
    if fmt.family is Family.GGUF and fmt.name.startswith(("iq1", "iq2", "iq3")):
        return fmt.load_codec().tile_aux(device)  # the lattice i-quants read their grid through aux
    if fmt.family is not Family.BNB:
        return None
    from .nf4 import code_4bit

    return code_4bit(fmt.name, device)


def dequantize(fmt: QuantFormat | str, data: torch.Tensor, dtype: torch.dtype = torch.float32,
               aux: torch.Tensor | None = None, double_quant: bool = False, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Triton dequantize of rows ``data`` (packed ``(rows, nbytes)`` or float ``(rows, n)``) to ``(rows, n)``.

    The same values as the codec's ``dequantize`` (the tile in float32, rounded once to ``dtype``). ``aux`` is
    the NF4/FP4 side table (the code values by default); ``out`` an optional preallocated result.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    check_launchable(data.device.type)
    if data.dim() != 2:
        raise UnsupportedFormat(f"expected rows of shape (rows, nbytes), got {tuple(data.shape)}")
    if fmt.family is not Family.FLOAT and (data.dtype != torch.uint8 or data.shape[1] % (
            33 if double_quant else fmt.type_size)):
        raise UnsupportedFormat(
            f"expected uint8 rows of whole {fmt.name} blocks, got {data.dtype} {tuple(data.shape)}")
    data = data.contiguous()
    rows, n = data.shape[0], elements_per_row(fmt, data, double_quant)
    if out is None:
        out = torch.empty((rows, n), dtype=dtype, device=data.device)
    if aux is None:
        aux = default_aux(fmt, data.device)
    if not (rows and n):
        return out
    whole = _BLOCK_KERNELS.get("bnb4" if fmt.family is Family.BNB else fmt.name)
    if whole is not None:
        kernel, nb, consts = whole
        n_blocks = rows * (n // fmt.block_size)
        if fmt.family is Family.BNB:
            consts = {"DQ": int(double_quant)}
        kernel[(triton.cdiv(n_blocks, nb),)](data, data if aux is None else aux, out, n_blocks, NB=nb, **consts,
                                             enable_fp_fusion=False)
        return out
    br, bc = DEQUANT_TILE
    grid = (triton.cdiv(rows, br), triton.cdiv(n, bc))
    dequant_kernel[grid](data, data if aux is None else aux, out, rows, n, data.shape[1],
                         TILE=load_tile(fmt, double_quant), BR=br, BC=bc, enable_fp_fusion=False)
    return out
