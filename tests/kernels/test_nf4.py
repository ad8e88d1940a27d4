"""NF4/FP4 codec against bitsandbytes, bit for bit, and the Triton kernels against the reference.

``bitsandbytes.functional.quantize_4bit`` on CPU is the oracle: its default backend does the 4-bit codes, its CPU
library the nested 8-bit absmax codes. The Triton kernels run under ``TRITON_INTERPRET=1`` on CPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from quantforge.kernels import nf4  # noqa: E402
from quantforge.kernels._triton import triton_available  # noqa: E402

from quantforge.errors import UnsupportedFormat  # noqa: E402
from quantforge.formats import get_format  # noqa: E402
from helpers.reference import interpreter_downcast  # noqa: E402

bnb_f = pytest.importorskip("bitsandbytes.functional")

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# numel: multiples of 64 and not, odd, a single element, more than one 256-block group of absmax.
SHAPES = [(64,), (1,), (63,), (7, 33), (3, 320), (129, 65), (1, 64 * 300 + 17), (2, 64 * 257)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Exact comparison key (distinguishes -0.0 from 0.0)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _first_bad_block(a: torch.Tensor, b: torch.Tensor, per_block: int) -> str:
    bad = (a.reshape(-1) != b.reshape(-1)).nonzero()
    return "equal" if bad.numel() == 0 else f"first bad block {int(bad[0]) // per_block} (element {int(bad[0])})"


def _weight(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02 * torch.exp(torch.randn(shape, generator=g))
    flat = w.view(-1)
    flat[: min(64, flat.numel()) // 2] = 0  # a (half) zero block
    if flat.numel() > 200:
        flat[128:192] = 0  # a whole zero block
        flat[70] = 1.0 / 0.9  # outlier
    return w.to(dtype)


def test_tables_match_bitsandbytes() -> None:
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    assert torch.equal(nf4.dynamic_map(), bnb_f.create_dynamic_map())
    for qt in nf4.QUANT_TYPES:
        assert torch.equal(_bits(nf4.code_4bit(qt)), _bits(bnb_f.get_4bit_type(qt, device="cpu")))
        bounds, order = _get_4bit_quantize_bounds(qt, torch.device("cpu"))
        ours_b, ours_o = nf4._bounds_cpu(qt)
        assert torch.equal(ours_b, bounds) and torch.equal(ours_o, order)


CASES = [(s, "bf16") for s in SHAPES] + [(s, "f32") for s in SHAPES[1:6]] + [(s, "f16") for s in SHAPES[2:5]]


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
@pytest.mark.parametrize("shape, dtype", CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else c)
def test_reference_matches_bitsandbytes(shape, dtype, quant_type, double_quant) -> None:
    w = _weight(shape, DTYPES[dtype], seed=len(shape) * 1000 + shape[-1])
    packed_b, state_b = bnb_f.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    packed, state = nf4.quantize_4bit(w, quant_type, double_quant, chunk=128)
    assert packed.shape == packed_b.shape and packed.dtype == torch.uint8
    assert torch.equal(packed, packed_b), _first_bad_block(packed, packed_b, 32)
    theirs, ours = state_b.as_dict(packed=True), state.tensors()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert torch.equal(_bits(ours[key]), _bits(theirs[key])), (key, _first_bad_block(ours[key], theirs[key], 1))
    deq_b = bnb_f.dequantize_4bit(packed_b, state_b).reshape(shape)
    assert torch.equal(_bits(nf4.dequantize_4bit(packed, state)), _bits(deq_b))


@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
def test_ties_and_extremes_match_bitsandbytes(quant_type: str) -> None:
    """Values exactly on code midpoints, codes themselves, +-0, subnormals and the clamp at +-1."""
    bounds, _ = nf4._bounds_cpu(quant_type)
    code = nf4.code_4bit(quant_type)
    special = torch.cat([bounds, code, torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1.0, -1.0]),
                         torch.nextafter(bounds, torch.full_like(bounds, 2.0)),
                         torch.nextafter(bounds, torch.full_like(bounds, -2.0))])
    blocks = special.reshape(-1)[: (special.numel() // 63) * 63].reshape(-1, 63)
    w = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1)  # absmax 1: scaled value == value
    w = torch.cat([w.reshape(-1), special[-5:]])  # plus a partial tail block
    for dq in (False, True):
        packed_b, state_b = bnb_f.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq)
        packed, state = nf4.quantize_4bit(w, quant_type, dq)
        assert torch.equal(packed, packed_b), _first_bad_block(packed, packed_b, 32)
        assert torch.equal(_bits(state.absmax), _bits(state_b.absmax))


def test_nested_8bit_matches_bitsandbytes_cpu_library() -> None:
    """The absmax codes: bitsandbytes' CPU library (65536-entry table), including partial and zero blocks."""
    g = torch.Generator().manual_seed(3)
    for n in (1, 7, 255, 256, 257, 1000, 4099):
        x = torch.rand(n, generator=g) - 0.3
        if n > 300:
            x[256:512] = 0
        q_b, st = bnb_f.quantize_blockwise(x, blocksize=256)
        q, absmax = nf4.quantize_blockwise_8bit(x)
        assert torch.equal(q, q_b), _first_bad_block(q, q_b, 256)
        assert torch.equal(absmax, st.absmax)


def test_quant_state_round_trip_and_bitsandbytes_reads_it() -> None:
    w = _weight((48, 192), torch.bfloat16, seed=5)
    for dq in (False, True):
        packed, state = nf4.quantize_4bit(w, "nf4", dq)
        again = nf4.QuantState4bit.from_tensors(state.tensors())
        assert again.shape == (48, 192) and again.dtype == torch.bfloat16 and again.nested == dq
        assert torch.equal(nf4.dequantize_4bit(packed, again), nf4.dequantize_4bit(packed, state))
        theirs = bnb_f.QuantState.from_dict({f"weight.{k}": v for k, v in state.tensors().items()}, device="cpu")
        assert torch.equal(bnb_f.dequantize_4bit(packed, theirs), nf4.dequantize_4bit(packed, state))


def test_registry_codec_round_trip() -> None:
    fmt = get_format("nf4")
    w = _weight((5, 256), torch.float32, seed=9)
    data = fmt.quantize(w)
    assert data.shape == fmt.byte_shape((5, 256)) == (5, 4 * 36)
    packed, state = nf4.quantize_4bit(w, "nf4")
    assert torch.equal(fmt.dequantize(data), nf4.dequantize_4bit(packed, state, torch.float32))
    assert torch.equal(get_format("fp4").dequantize(get_format("fp4").quantize(w)),
                       nf4.dequantize_4bit(*nf4.quantize_4bit(w, "fp4"), torch.float32))


def test_errors() -> None:
    with pytest.raises(UnsupportedFormat, match="nf4 or fp4"):
        nf4.quantize_4bit(torch.zeros(64), "int4")
    with pytest.raises(UnsupportedFormat, match="bf16/fp16/fp32"):
        nf4.quantize_4bit(torch.zeros(64, dtype=torch.int8))
    with pytest.raises(UnsupportedFormat, match="multiple of 64"):
        nf4.NF4.quantize(torch.zeros(2, 65))


@pytest.mark.skipif(not triton_available(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
@pytest.mark.parametrize("shape", [(63,), (7, 33), (33, 64), (3, 200)], ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(shape, quant_type, double_quant) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = _weight(shape, torch.bfloat16, seed=shape[-1]).to(device)
    packed, state = nf4.quantize_4bit(w, quant_type, double_quant)
    packed_t, state_t = nf4.quantize_4bit_triton(w, quant_type, double_quant, blocks_per_program=2)
    assert torch.equal(packed_t, packed), _first_bad_block(packed_t, packed, 32)
    for (k, a), b in zip(state.tensors().items(), state_t.tensors().values(), strict=True):
        assert torch.equal(_bits(a), _bits(b)), k
    ref = nf4.dequantize_4bit(packed, state, torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        out = nf4.dequantize_4bit_triton(packed, state, dtype, blocks_per_program=2)
        assert out.shape == ref.shape and out.dtype == dtype
        assert torch.equal(_bits(out), _bits(interpreter_downcast(ref, dtype)))
