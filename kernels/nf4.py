"""NF4 / FP4: the bitsandbytes 4-bit formats, blocks of 64 weights with one absmax each.

Layout, as ``bitsandbytes.functional.quantize_4bit(A, blocksize=64, quant_type=..., compress_statistics=...)``
writes it for a weight ``A`` of ``n`` elements (row-major flattened):

* ``packed``: uint8 ``(ceil(n/2), 1)``; byte ``i`` holds element ``2i`` in the high nibble and ``2i+1`` in the low
  nibble (an odd ``n`` is padded with one quantized zero).
* ``absmax``: float32 ``(ceil(n/64),)``, the largest ``|A|`` of each block (the block is scaled by its reciprocal).
* double quantization (``compress_statistics=True``): ``offset = absmax.mean()``, then ``absmax - offset`` is
  quantized to uint8 with the signed 8-bit dynamic map in blocks of 256: ``absmax`` becomes uint8
  ``(ceil(n/64),)``, plus ``nested_absmax`` float32 ``(ceil(n/16384),)`` and ``nested_code`` float32 ``(256,)``.

Rounding mirrors bitsandbytes exactly (read from its CPU/default backends, version 0.50):

* 4-bit codes (``backends/default/ops.py``): ``x = clamp(A * (1 / max(absmax, 1e-38)), -1, 1)`` for whole blocks,
  ``A / max(absmax, 1e-38)`` for a trailing partial block (whose stored absmax is the clamped one); the code is
  the number of midpoints of the sorted code table strictly below ``x`` (a tie goes to the lower value), mapped
  back through the table's sort order for FP4 (small positive ``x`` becomes code 8, ``-0``).
* nested 8-bit codes (``csrc/cpu_ops.cpp``, the CPU library): ``v = clamp(x * (1 / absmax), -1, 1)``, then a
  65536-entry table indexed by ``trunc(((v + 1) * 0.5) * 65535 + 0.5)``; entry ``i`` is the number of code
  midpoints below ``-1 + 2i / 65535``. A block whose absmax is 0 gets codes 0.
* bitsandbytes' own CUDA kernels round differently in three places (measured on an H100 against bitsandbytes
  0.50.2, random Llama-8B-shaped weights): an all-zero block gets code 0 instead of the zero code, FP4 uses a
  decision tree (about 1.2% of bytes differ), and nested absmax codes come from an exact nearest search (about
  0.3% differ). NF4 codes of non-zero blocks and the offset matched exactly. We follow the CPU backends, which
  is what transformers writes without a GPU; the Triton kernels give the same bytes as the reference here.
* dequantize: ``code[q] * absmax`` in float32 (nested: ``nested_code[q8] * nested_absmax + offset`` first).

A PyTorch reference (any device) sits beside the Triton kernels (quantize and dequantize of the flat
bitsandbytes layout). Matmul and merge kernels read NF4/FP4 through the registry tiles of :mod:`.tiles`
(``bnb4_tile``, ``bnb4_dq_tile``), which decode the same values. The registry codecs ``NF4``/``FP4`` adapt the
reference to the row layout of :mod:`quantforge.formats` (per block: 32 packed bytes then the float32 absmax).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from ..errors import UnsupportedFormat
from ..formats import get_format
from ._blocks import as_byte_blocks
from ._triton import HAVE_TRITON, check_launchable, tl, triton

QK = get_format("nf4").block_size
NESTED_BLOCK = get_format("nf4").nested_block
QUANT_TYPES = ("nf4", "fp4")
_TINY = 1e-38
_LUT_SIZE = 65536

_NF4_VALUES = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
_FP4_VALUES = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
# Code index at each position of the ascending FP4 table, as bitsandbytes' torch.argsort returns it (0.0 at
# index 0 sorts before the second 0.0 at index 8); tests check it against bitsandbytes.
_FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _check_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise UnsupportedFormat(f"unknown 4-bit quant type {quant_type!r}; expected nf4 or fp4")


@functools.lru_cache(maxsize=None)
def _code_cpu(quant_type: str) -> torch.Tensor:
    _check_type(quant_type)
    data = torch.tensor(_NF4_VALUES if quant_type == "nf4" else _FP4_VALUES, dtype=torch.float32)
    return data.div_(data.abs().max())


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 values a 4-bit code stands for (``bitsandbytes.functional.get_4bit_type``)."""
    return _code_cpu(quant_type).to(device)


@functools.lru_cache(maxsize=None)
def _bounds_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_cpu(quant_type)
    order = torch.arange(16) if quant_type == "nf4" else torch.tensor(_FP4_ORDER)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


@functools.lru_cache(maxsize=1)
def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic code (256 float32 values), as ``bitsandbytes.functional.create_dynamic_map()``."""
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _nested_lut(device: str) -> torch.Tensor:
    code = dynamic_map()
    mid = (code[:-1] + code[1:]) * 0.5
    val = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(mid, val).to(torch.uint8).to(device)


@dataclass
class QuantState4bit:
    """What dequantizing a packed 4-bit weight needs; serialized under bitsandbytes' key names."""

    quant_type: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int = QK
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCK

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def info_json(self) -> str:
        """The JSON bitsandbytes packs into ``quant_state.bitsandbytes__<type>`` (same keys, order and spacing)."""
        info: dict[str, object] = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                                   "dtype": _DTYPE_NAMES[self.dtype], "shape": list(self.shape)}
        if self.nested:
            info.update({"nested_blocksize": self.nested_blocksize, "nested_dtype": "float32",
                         "nested_offset": float(self.offset.item())})
        return json.dumps(info)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Suffix -> tensor, as ``QuantState.as_dict(packed=True)``: absmax, quant_map, nested_*, quant_state.*."""
        out = {"absmax": self.absmax, "quant_map": self.code}
        if self.nested:
            out["nested_absmax"] = self.nested_absmax
            out["nested_quant_map"] = self.nested_code
        raw = self.info_json().encode("utf-8")
        out[f"quant_state.bitsandbytes__{self.quant_type}"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> QuantState4bit:
        """Inverse of :meth:`tensors` (keys are the suffixes after ``weight.``)."""
        key = next((k for k in tensors if k.startswith("quant_state.bitsandbytes__")), None)
        if key is None:
            raise UnsupportedFormat(f"no quant_state.bitsandbytes__* tensor among {sorted(tensors)}")
        info = json.loads(bytes(tensors[key].cpu().numpy().tobytes()).decode("utf-8"))
        nested = "nested_offset" in info
        return cls(
            quant_type=info["quant_type"], shape=tuple(info["shape"]), dtype=getattr(torch, info["dtype"]),
            absmax=tensors["absmax"], code=tensors["quant_map"], blocksize=int(info["blocksize"]),
            offset=torch.tensor(float(info["nested_offset"]), dtype=torch.float32) if nested else None,
            nested_absmax=tensors["nested_absmax"] if nested else None,
            nested_code=tensors["nested_quant_map"] if nested else None,
            nested_blocksize=int(info.get("nested_blocksize", NESTED_BLOCK)),
        )

    def float_absmax(self) -> torch.Tensor:
        """Per-block float32 scale (nested codes decoded and the offset added back)."""
        if not self.nested:
            return self.absmax.float()
        return dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_code,
                                         self.nested_blocksize) + self.offset.to(self.absmax.device)


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dtype not in _DTYPE_NAMES:
        raise UnsupportedFormat(f"4-bit quantization takes bf16/fp16/fp32 weights, got {weight.dtype}")
    if weight.numel() == 0:
        raise UnsupportedFormat("cannot quantize an empty tensor")


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D float32 -> (uint8 codes of the dynamic map, float32 absmax per block), as bitsandbytes' CPU library."""
    n = x.numel()
    nb = -(-n // blocksize)
    flat = torch.zeros(nb * blocksize, dtype=torch.float32, device=x.device)
    flat[:n] = x.reshape(-1)
    blocks = flat.view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    v = (blocks * (1.0 / absmax)[:, None]).clamp(-1.0, 1.0)
    cell = ((((v + 1.0) * 0.5) * float(_LUT_SIZE - 1)) + 0.5).to(torch.int32).clamp_(0, _LUT_SIZE - 1)
    q = _nested_lut(str(x.device))[cell.long()]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = NESTED_BLOCK) -> torch.Tensor:
    """uint8 codes -> float32 ``code[q] * absmax[block]``."""
    blk = torch.arange(q.numel(), device=q.device) // blocksize
    return code.to(q.device)[q.long()] * absmax.to(q.device)[blk]


def _codes(x: torch.Tensor, quant_type: str) -> torch.Tensor:
    bounds, order = _bounds_cpu(quant_type)
    q = torch.bucketize(x, bounds.to(x.device), out_int32=True)
    return q if quant_type == "nf4" else order.to(x.device)[q].to(torch.int32)


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = False,
                  chunk: int = 1 << 22) -> tuple[torch.Tensor, QuantState4bit]:
    """Reference quantizer: ``weight`` (any shape, bf16/fp16/fp32) -> (packed uint8 ``(ceil(n/2), 1)``, state).

    Works in chunks of ``chunk`` elements (a multiple of 64) to bound temporary memory; the result does not
    depend on it.
    """
    _check_type(quant_type)
    _check_weight(weight)
    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % QK
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(-(-n // QK), dtype=torch.float32, device=weight.device)
    step = max(chunk - chunk % QK, QK)
    for start in range(0, n, step):
        stop = min(start + step, n)
        part = flat[start:stop].float()
        whole = min(stop, full) - start
        scaled = []
        if whole > 0:
            blocks = part[:whole].view(-1, QK)
            am = blocks.abs().amax(dim=1)
            absmax[start // QK:start // QK + am.numel()] = am
            scaled.append(torch.clamp(blocks * (1.0 / am.clamp(min=_TINY))[:, None], -1, 1).reshape(-1))
        if stop > full:
            am = part[whole:].abs().max().clamp(min=_TINY)
            absmax[-1] = am
            scaled.append(torch.clamp(part[whole:] / am, -1, 1))
        x = torch.cat(scaled) if len(scaled) > 1 else scaled[0]
        if x.numel() % 2:
            x = torch.nn.functional.pad(x, (0, 1))
        q = _codes(x, quant_type).to(torch.uint8)
        packed[start // 2:start // 2 + q.numel() // 2] = (q[::2] << 4) | q[1::2]
    return packed.unsqueeze(1), _state(absmax, weight, quant_type, double_quant)


def _state(absmax: torch.Tensor, weight: torch.Tensor, quant_type: str, double_quant: bool) -> QuantState4bit:
    code = code_4bit(quant_type, weight.device)
    if not double_quant:
        return QuantState4bit(quant_type, tuple(weight.shape), weight.dtype, absmax, code)
    offset = absmax.mean()
    q, nested = quantize_blockwise_8bit(absmax - offset)
    return QuantState4bit(quant_type, tuple(weight.shape), weight.dtype, q, code, offset=offset,
                          nested_absmax=nested, nested_code=dynamic_map().to(weight.device))


def dequantize_4bit(packed: torch.Tensor, state: QuantState4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference dequantizer: packed bytes + state -> tensor of ``state.shape`` in ``dtype`` (default state.dtype)."""
    n = 1
    for d in state.shape:
        n *= d
    b = packed.reshape(-1).to(torch.uint8)
    q = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n].long()
    scale = state.float_absmax().to(b.device)
    vals = state.code.to(b.device)[q] * scale[torch.arange(n, device=b.device) // state.blocksize]
    return vals.to(dtype or state.dtype).reshape(state.shape)


@dataclass(frozen=True)
class Codec4bit:
    """Registry adapter (:mod:`quantforge.formats` contract): rows of 36-byte blocks, 32 code bytes + f32 absmax.

    No double quantization here; ``imatrix`` is accepted and ignored (bitsandbytes has no weighted search).
    """

    quant_type: str

    def quantize(self, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        if weight.dim() != 2 or weight.shape[1] % QK:
            raise UnsupportedFormat(f"expected (rows, n) with n a multiple of {QK}, got {tuple(weight.shape)}")
        packed, state = quantize_4bit(weight, self.quant_type)
        codes = packed.view(-1, QK // 2)
        scale = state.absmax.contiguous().view(torch.uint8).view(-1, 4)
        return torch.cat([codes, scale], dim=1).reshape(weight.shape[0], -1)

    def dequantize(self, data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        b = as_byte_blocks(data, QK // 2 + 4)
        absmax = b[:, QK // 2:].contiguous().view(torch.float32).reshape(-1)
        rows = data.shape[0]
        state = QuantState4bit(self.quant_type, (rows, b.shape[0] * QK // rows), dtype, absmax,
                               code_4bit(self.quant_type, data.device))
        return dequantize_4bit(b[:, :QK // 2].contiguous(), state, dtype)


NF4 = Codec4bit("nf4")
FP4 = Codec4bit("fp4")


if HAVE_TRITON:

    @triton.jit
    def quant_4bit_kernel(src, packed, absmax, bounds, order, n, n_full_blocks, n_blocks,
                          BLOCKS: tl.constexpr, QKB: tl.constexpr, REMAP: tl.constexpr):
        """Quantize ``BLOCKS`` blocks of ``QKB`` weights per program, exactly as :func:`quantize_4bit`."""
        blk = (tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)).to(tl.int64)
        j = tl.arange(0, QKB)
        idx = blk[:, None] * QKB + j[None, :]
        x = tl.load(src + idx, mask=idx < n, other=0.0).to(tl.float32)
        am = tl.max(tl.abs(x), axis=1)
        amc = tl.maximum(am, tl.full([BLOCKS], 1e-38, tl.float32))
        whole = blk < n_full_blocks
        recip = tl.math.div_rn(tl.full([BLOCKS], 1.0, tl.float32), amc)
        s = tl.where(whole[:, None], x * recip[:, None], tl.math.div_rn(x, amc[:, None]))
        s = tl.minimum(tl.maximum(s, -1.0), 1.0)
        q = tl.zeros([BLOCKS, QKB], dtype=tl.int32)
        for i in tl.static_range(15):
            q += (s > tl.load(bounds + i)).to(tl.int32)
        if REMAP:
            q = tl.load(order + q)
        hi, lo = tl.split(tl.reshape(q, [BLOCKS, QKB // 2, 2]))
        jb = tl.arange(0, QKB // 2)
        bidx = blk[:, None] * (QKB // 2) + jb[None, :]
        tl.store(packed + bidx, ((hi << 4) | lo).to(tl.uint8), mask=bidx < (n + 1) // 2)
        tl.store(absmax + blk, tl.where(whole, am, amc), mask=blk < n_blocks)

    @triton.jit
    def dequant_4bit_blocks(packed, absmax, code, blk, mask, n_bytes, BLOCKS: tl.constexpr, QKB: tl.constexpr):
        """Dequantize the 4-bit blocks ``blk`` (1-D, ``BLOCKS`` long) of the flat layout to ``[BLOCKS, QKB]``.

        ``packed`` points at the code bytes (``QKB/2`` per block, high nibble first), ``absmax`` at the float32
        per-block scales (already decoded when double-quantized), ``code`` at the 16 float32 code values.
        """
        jb = tl.arange(0, QKB // 2)
        bidx = blk[:, None] * (QKB // 2) + jb[None, :]
        b = tl.load(packed + bidx, mask=mask[:, None] & (bidx < n_bytes), other=0).to(tl.int32)
        q = tl.reshape(tl.join(b >> 4, b & 15), [BLOCKS, QKB])
        scale = tl.load(absmax + blk, mask=mask, other=0.0)
        return tl.load(code + q) * scale[:, None]

    @triton.jit
    def dequant_4bit_kernel(packed, absmax, code, dst, n, n_blocks, BLOCKS: tl.constexpr, QKB: tl.constexpr):
        blk = (tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)).to(tl.int64)
        y = dequant_4bit_blocks(packed, absmax, code, blk, blk < n_blocks, (n + 1) // 2, BLOCKS, QKB)
        idx = blk[:, None] * QKB + tl.arange(0, QKB)[None, :]
        tl.store(dst + idx, y.to(dst.dtype.element_ty, fp_downcast_rounding="rtne"), mask=idx < n)


def quantize_4bit_triton(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = False,
                         blocks_per_program: int = 16) -> tuple[torch.Tensor, QuantState4bit]:
    """Triton quantizer, same bytes as :func:`quantize_4bit` (the nested absmax step runs in PyTorch)."""
    _check_type(quant_type)
    _check_weight(weight)
    check_launchable(weight.device.type)
    flat = weight.reshape(-1).contiguous()
    n = flat.numel()
    n_blocks = -(-n // QK)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=weight.device)
    bounds, order = _bounds_cpu(quant_type)
    quant_4bit_kernel[(triton.cdiv(n_blocks, blocks_per_program),)](
        flat, packed, absmax, bounds.to(weight.device), order.to(weight.device, torch.int32), n, n // QK, n_blocks,
        BLOCKS=blocks_per_program, QKB=QK, REMAP=quant_type != "nf4")
    return packed.unsqueeze(1), _state(absmax, weight, quant_type, double_quant)


def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState4bit, dtype: torch.dtype | None = None,
                           blocks_per_program: int = 16) -> torch.Tensor:
    """Triton dequantizer, same values as :func:`dequantize_4bit` (nested absmax decoded in PyTorch first)."""
    check_launchable(packed.device.type)
    n = 1
    for d in state.shape:
        n *= d
    n_blocks = -(-n // state.blocksize)
    out = torch.empty(n, dtype=dtype or state.dtype, device=packed.device)
    scale = state.float_absmax().to(packed.device).contiguous()
    dequant_4bit_kernel[(triton.cdiv(n_blocks, blocks_per_program),)](
        packed.reshape(-1).contiguous(), scale, state.code.to(packed.device).contiguous(), out, n, n_blocks,
        BLOCKS=blocks_per_program, QKB=state.blocksize)
    return out.reshape(state.shape)
