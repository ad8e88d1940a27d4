"""A frozen linear weight held in one registry format, as the fused LoRA linear and the merge code read it.

Layouts of ``QuantWeight.data`` (``(out_features, ...)``, one row per output feature):

* float formats (``f32``, ``f16``, ``bf16``): the ``(out, in)`` float tensor itself;
* GGUF formats and plain NF4/FP4: the packed bytes ``(out, nbytes_per_row)`` uint8 exactly as the registry codec
  emits them (NF4/FP4: 36-byte blocks of 32 code bytes then the float32 absmax);
* double-quantized NF4/FP4 (bitsandbytes ``compress_statistics=True``): 33-byte blocks of 32 code bytes (high
  nibble first) then the uint8 code of the block's absmax; the nested state lives in ``extra["aux"]``.

``extra["aux"]`` is the side table the Triton tiles read, filled in on construction for the formats that have one
(:func:`.tiles.default_aux`). NF4/FP4: float32, the 16 code values, then for double quantization the 256 nested
code values, the offset, and one nested absmax per 256 blocks (blocks counted over the whole row-major tensor, as
bitsandbytes does).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedFormat
from ..formats import Family, QuantFormat, get_format

_FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
#: Float32 offsets inside ``extra["aux"]`` of a double-quantized NF4/FP4 weight.
AUX_NESTED_CODE = 16
AUX_OFFSET = AUX_NESTED_CODE + 256
AUX_NESTED_ABSMAX = AUX_OFFSET + 1
#: Bytes per 64-weight block of a double-quantized NF4/FP4 weight: 32 code bytes + the absmax code.
DQ_BLOCK_BYTES = 33


@dataclass
class QuantWeight:
    """A frozen linear weight ``(out_features, in_features)`` held in a registry format."""

    fmt: str
    data: torch.Tensor
    shape: tuple[int, int]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Kernels read rows at data.stride(0) and 16/32-bit fields through typed pointers: keep the storage
        # contiguous and 16-byte aligned (a view into a file buffer may start at any byte).
        if not self.data.is_contiguous() or self.data.data_ptr() % 16:
            self.data = self.data.clone(memory_format=torch.contiguous_format)
        if "aux" not in self.extra:
            from .tiles import default_aux

            aux = default_aux(self.format, self.data.device)
            if aux is not None:
                self.extra["aux"] = aux

    @classmethod
    def quantize(cls, weight: torch.Tensor, fmt: str, imatrix: torch.Tensor | None = None, *,
                 double_quant: bool = True) -> QuantWeight:
        """Encode a 2-D float ``weight`` with the registry codec of ``fmt`` (the same bytes the exporters write).

        ``double_quant`` applies to NF4/FP4 only (bitsandbytes' nested 8-bit absmax); ``imatrix`` to the GGUF
        types that take one.
        """
        if weight.dim() != 2:
            raise UnsupportedFormat(f"QuantWeight takes a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        f = get_format(fmt)
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        if f.family is Family.FLOAT:
            return cls(f.name, weight.detach().to(_FLOAT_DTYPES[f.name]).contiguous(), shape)
        if not f.fits(shape[1]):
            raise UnsupportedFormat(
                f"format {f.name} needs in_features that are a multiple of {f.block_size}, got {shape[1]}")
        if f.family is Family.BNB:
            return cls._quantize_4bit(weight.detach(), f, double_quant)
        return cls(f.name, f.quantize(weight.detach(), imatrix), shape)

    @classmethod
    def _quantize_4bit(cls, weight: torch.Tensor, f: QuantFormat, double_quant: bool) -> QuantWeight:
        from . import nf4

        shape = (int(weight.shape[0]), int(weight.shape[1]))
        code = nf4.code_4bit(f.name, weight.device)
        if not double_quant:
            return cls(f.name, f.quantize(weight), shape, {"aux": code})
        packed, state = nf4.quantize_4bit(weight, f.name, double_quant=True)
        blocks = torch.cat([packed.view(-1, f.block_size // 2), state.absmax.view(-1, 1)], dim=1)
        aux = torch.cat([code, state.nested_code.to(weight.device), state.offset.reshape(1).float(),
                         state.nested_absmax.float()])
        return cls(f.name, blocks.reshape(shape[0], -1).contiguous(), shape, {"aux": aux})

    @property
    def format(self) -> QuantFormat:
        return get_format(self.fmt)

    @property
    def double_quant(self) -> bool:
        """True for NF4/FP4 weights with a nested 8-bit absmax (33-byte blocks)."""
        return self.format.family is Family.BNB and self.data.shape[1] * 64 == self.shape[1] * DQ_BLOCK_BYTES

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """``(out, in)`` in ``dtype``: exactly the codec's float32 values, rounded once to ``dtype``."""
        f = self.format
        if f.family is Family.FLOAT:
            return self.data.to(dtype)
        if self.double_quant:
            return self._dequantize_dq(dtype)
        return f.dequantize(self.data, dtype)

    def _dequantize_dq(self, dtype: torch.dtype) -> torch.Tensor:
        from . import nf4

        half = self.format.block_size // 2
        blocks = self.data.reshape(-1, DQ_BLOCK_BYTES)
        aux = self.extra["aux"]
        state = nf4.QuantState4bit(
            self.fmt, self.shape, dtype, blocks[:, half].contiguous(), aux[:AUX_NESTED_CODE],
            blocksize=self.format.block_size, offset=aux[AUX_OFFSET], nested_absmax=aux[AUX_NESTED_ABSMAX:],
            nested_code=aux[AUX_NESTED_CODE:AUX_OFFSET])
        return nf4.dequantize_4bit(blocks[:, :half].contiguous(), state, dtype)

    def to(self, device: torch.device | str) -> QuantWeight:
        return QuantWeight(self.fmt, self.data.to(device), self.shape, {k: v.to(device) for k, v in self.extra.items()})

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed data plus the side tables."""
        return self.data.numel() * self.data.element_size() + sum(
            v.numel() * v.element_size() for v in self.extra.values())


CPU_CACHE_BYTES = int(os.environ.get("QUANTFORGE_CPU_DEQUANT_CACHE_MB", "1024")) << 20
"""Budget of :func:`compute_copy`'s cache of dequantized CPU weights (``QUANTFORGE_CPU_DEQUANT_CACHE_MB``)."""

_cache: OrderedDict[tuple[int, int, torch.dtype], tuple[weakref.ref, torch.Tensor]] = OrderedDict()
_cache_lock = threading.Lock()


def compute_copy(weight: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """A read-only ``(out, in)`` copy of ``weight`` in ``dtype`` for a GEMM.

    On the CPU the codecs dequantize slowly, and a training step reads every base weight two or three times
    (forward, recomputation, backward), so CPU copies stay in a least-recently-used cache of at most
    :data:`CPU_CACHE_BYTES` (a weight larger than that is never kept). The values are exactly
    :meth:`QuantWeight.dequantize`'s. Callers must not write to the result."""
    if weight.format.family is Family.FLOAT or weight.data.device.type != "cpu":
        return weight.dequantize(dtype)
    key = (id(weight), weight.data.data_ptr(), dtype)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0]() is weight:
            _cache.move_to_end(key)
            return hit[1]
    out = weight.dequantize(dtype)
    if out.numel() * out.element_size() > CPU_CACHE_BYTES:
        return out
    with _cache_lock:
        _cache[key] = (weakref.ref(weight), out)
        for k in [k for k, (ref, _) in _cache.items() if ref() is None]:
            del _cache[k]
        total = sum(t.numel() * t.element_size() for _, t in _cache.values())
        while total > CPU_CACHE_BYTES:
            _, (_, t) = _cache.popitem(last=False)
            total -= t.numel() * t.element_size()
    return out
