"""The one registry of tensor formats every stage reads.

A *format* is how one tensor is encoded (``q4_k``, ``nf4``, ``bf16``). How a file mixes formats is a
*preset* or a *plan* (``q4_k_m``), which lives in :mod:`quantforge.presets`, not here.

Codec contract (each ``codec`` module path names a module exposing these, imported lazily):

* ``quantize(weight, imatrix=None) -> uint8 tensor``: ``weight`` is a 2-D float tensor ``(rows, n_per_row)``
  with ``n_per_row % block_size == 0``; ``imatrix`` is an optional float tensor ``(n_per_row,)`` of per-column
  importance (mean squared activations). Returns ``(rows, n_per_row // block_size * type_size)`` bytes,
  each row the GGUF block layout of that row.
* ``dequantize(data, dtype=torch.float32) -> tensor``: the inverse, ``(rows, nbytes) -> (rows, n_per_row)``.

Only the standard library is imported here, so ``import quantforge.formats`` stays light.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass
from typing import Any

from .errors import RegistryError, UnsupportedFormat


class Family(str, enum.Enum):
    FLOAT = "float"
    GGUF = "gguf"
    BNB = "bnb"


@dataclass(frozen=True)
class QuantFormat:
    """One tensor encoding: ``block_size`` weights take ``type_size`` bytes."""

    name: str
    family: Family
    block_size: int
    type_size: int
    ggml_type: int | None
    codec: str | None = None
    takes_imatrix: bool = False
    tile: str | None = None
    """``module:function`` of the ``@triton.jit`` tile dequantizer (signature in :mod:`quantforge.kernels.tiles`)."""
    nested_block: int | None = None
    """bitsandbytes 4-bit only: blocks per float32 nested absmax under double quantization (each block's absmax
    is stored as one uint8 code)."""

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def fits(self, n_per_row: int) -> bool:
        """True when a row of ``n_per_row`` weights splits into whole blocks."""
        return n_per_row % self.block_size == 0

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of PyTorch ``shape`` (last dim = row) in this format."""
        n_per_row = shape[-1]
        if not self.fits(n_per_row):
            raise UnsupportedFormat(
                f"format {self.name} needs rows that are a multiple of {self.block_size}, got row length {n_per_row}"
            )
        n = 1
        for d in shape:
            n *= d
        return n // self.block_size * self.type_size

    def byte_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """PyTorch shape of the packed uint8 tensor holding a tensor of ``shape``."""
        self.nbytes(shape)
        return (*shape[:-1], shape[-1] // self.block_size * self.type_size)

    def load_codec(self) -> Any:
        """Import the codec (``module`` or ``module:attribute``) on first use."""
        if self.codec is None:
            raise UnsupportedFormat(f"format {self.name} has no codec")
        module, _, attr = self.codec.partition(":")
        mod = importlib.import_module(module)
        return getattr(mod, attr) if attr else mod

    def quantize(self, weight: Any, imatrix: Any = None) -> Any:
        """Encode a 2-D float tensor ``(rows, n_per_row)`` to packed bytes ``(rows, nbytes_per_row)``.

        CPU tensors of the GGUF types go straight to the C kernels (the same bytes as the codec, which would call
        them too) without importing the codec module, whose Triton kernels cost ~0.4 s of imports."""
        self.nbytes(tuple(weight.shape))
        if self.family is Family.GGUF and getattr(getattr(weight, "device", None), "type", None) == "cpu":
            from .kernels import _cpu_fast

            if self.name in _cpu_fast.TYPES and _cpu_fast.enabled(weight):
                return _cpu_fast.quantize(self.name, weight, imatrix if self.takes_imatrix else None)
        return self.load_codec().quantize(weight, imatrix)

    def dequantize(self, data: Any, dtype: Any = None) -> Any:
        """Decode packed bytes ``(rows, nbytes_per_row)`` to float ``(rows, n_per_row)`` (float32 by default)."""
        codec = self.load_codec()
        return codec.dequantize(data) if dtype is None else codec.dequantize(data, dtype)


FORMATS: dict[str, QuantFormat] = {}
_BY_GGML: dict[int, QuantFormat] = {}


def register(fmt: QuantFormat) -> QuantFormat:
    """Add ``fmt`` to the registry; a duplicate name or GGML id is a :class:`RegistryError`."""
    if fmt.name in FORMATS:
        raise RegistryError(f"format name {fmt.name!r} is already registered")
    if fmt.ggml_type is not None and fmt.ggml_type in _BY_GGML:
        raise RegistryError(f"GGML type id {fmt.ggml_type} is already registered as {_BY_GGML[fmt.ggml_type].name!r}")
    FORMATS[fmt.name] = fmt
    if fmt.ggml_type is not None:
        _BY_GGML[fmt.ggml_type] = fmt
    return fmt


def get_format(name: str) -> QuantFormat:
    """Look up a format by name (case-insensitive); unknown names list the valid ones."""
    key = name.lower()
    if key not in FORMATS:
        raise UnsupportedFormat(f"unknown tensor format {name!r}; expected one of {', '.join(sorted(FORMATS))}")
    return FORMATS[key]


def by_ggml_type(type_id: int) -> QuantFormat:
    if type_id not in _BY_GGML:
        raise UnsupportedFormat(f"GGML type id {type_id} is not supported by quantforge")
    return _BY_GGML[type_id]


_K = "quantforge.kernels."
_T = _K + "tiles:"
for _f in (
    QuantFormat("f32", Family.FLOAT, 1, 4, 0, _K + "floats:F32", tile=_T + "float_tile"),
    QuantFormat("f16", Family.FLOAT, 1, 2, 1, _K + "floats:F16", tile=_T + "float_tile"),
    QuantFormat("bf16", Family.FLOAT, 1, 2, 30, _K + "floats:BF16", tile=_T + "float_tile"),
    QuantFormat("q4_0", Family.GGUF, 32, 18, 2, _K + "legacy:Q4_0", takes_imatrix=True, tile=_T + "q4_0_tile"),
    QuantFormat("q4_1", Family.GGUF, 32, 20, 3, _K + "legacy:Q4_1", takes_imatrix=True, tile=_T + "q4_1_tile"),
    QuantFormat("q5_0", Family.GGUF, 32, 22, 6, _K + "legacy:Q5_0", takes_imatrix=True, tile=_T + "q5_0_tile"),
    QuantFormat("q5_1", Family.GGUF, 32, 24, 7, _K + "legacy:Q5_1", takes_imatrix=True, tile=_T + "q5_1_tile"),
    QuantFormat("q8_0", Family.GGUF, 32, 34, 8, _K + "q8_0", tile=_T + "q8_0_tile"),
    QuantFormat("q2_k", Family.GGUF, 256, 84, 10, _K + "q2_k", takes_imatrix=True, tile=_T + "q2_k_tile"),
    QuantFormat("q3_k", Family.GGUF, 256, 110, 11, _K + "q3_k", takes_imatrix=True, tile=_T + "q3_k_tile"),
    QuantFormat("q4_k", Family.GGUF, 256, 144, 12, _K + "k45:Q4_K", takes_imatrix=True, tile=_T + "q4_k_tile"),
    QuantFormat("q5_k", Family.GGUF, 256, 176, 13, _K + "k45:Q5_K", takes_imatrix=True, tile=_T + "q5_k_tile"),
    QuantFormat("q6_k", Family.GGUF, 256, 210, 14, _K + "q6_k", takes_imatrix=True, tile=_T + "q6_k_tile"),
    QuantFormat("iq4_nl", Family.GGUF, 32, 18, 20, _K + "iq4_nl", takes_imatrix=True, tile=_T + "iq4_nl_tile"),
    QuantFormat("iq4_xs", Family.GGUF, 256, 136, 23, _K + "iq4_xs", takes_imatrix=True, tile=_T + "iq4_xs_tile"),
    QuantFormat("nf4", Family.BNB, 64, 36, None, _K + "nf4:NF4", tile=_T + "bnb4_tile", nested_block=256),
    QuantFormat("fp4", Family.BNB, 64, 36, None, _K + "nf4:FP4", tile=_T + "bnb4_tile", nested_block=256),
):
    register(_f)
del _f

# The 1- to 3-bit lattice i-quants (IQ1_S, IQ2_XXS and IQ2_XS cannot be made without an imatrix).
for _f in (
    QuantFormat("iq2_xxs", Family.GGUF, 256, 66, 16, _K + "iq2_xxs", takes_imatrix=True,
                tile=_K + "iq2_xxs:iq2_xxs_tile"),
    QuantFormat("iq2_xs", Family.GGUF, 256, 74, 17, _K + "iq2_xs", takes_imatrix=True,
                tile=_K + "iq2_xs:iq2_xs_tile"),
    QuantFormat("iq3_xxs", Family.GGUF, 256, 98, 18, _K + "iq3_xxs", takes_imatrix=True,
                tile=_K + "iq3_xxs:iq3_xxs_tile"),
    QuantFormat("iq1_s", Family.GGUF, 256, 50, 19, _K + "iq1_s", takes_imatrix=True, tile=_K + "iq1_s:iq1_s_tile"),
    QuantFormat("iq1_m", Family.GGUF, 256, 56, 29, _K + "iq1_m", takes_imatrix=True, tile=_K + "iq1_m:iq1_m_tile"),
    QuantFormat("iq3_s", Family.GGUF, 256, 110, 21, _K + "iq3_s", takes_imatrix=True, tile=_K + "iq3_s:iq3_s_tile"),
    QuantFormat("iq2_s", Family.GGUF, 256, 82, 22, _K + "iq2_s", takes_imatrix=True, tile=_K + "iq2_s:iq2_s_tile"),
):
    register(_f)
del _f

# The ternary types (BitNet b1.58 / TriLM weights; ggml's ref quantizers take no imatrix).
for _f in (
    QuantFormat("tq1_0", Family.GGUF, 256, 54, 34, _K + "tq:TQ1_0", tile=_K + "tq:tq1_0_tile"),
    QuantFormat("tq2_0", Family.GGUF, 256, 66, 35, _K + "tq:TQ2_0", tile=_K + "tq:tq2_0_tile"),
):
    register(_f)
del _f
