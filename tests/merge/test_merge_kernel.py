"""The Triton merge kernel (interpreter on CPU) against the PyTorch reference merge, for every base format."""

from __future__ import annotations

import pytest
import torch
from helpers.reference import interpreter_downcast
from quantforge.kernels.merge import merge_blas, merge_reference, merge_triton
from quantforge.kernels.qweight import QuantWeight

from quantforge.formats import FORMATS, Family

GGUF_TYPES = sorted(n for n, f in FORMATS.items() if f.family is Family.GGUF)
CASES = [("bf16", False), ("f32", False), ("nf4", False), ("nf4", True), ("fp4", True)]
CASES += [(t, False) for t in GGUF_TYPES]


def _factors(out: int, n: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = torch.randn(out, n) * 0.05
    return w, torch.randn(r, n) * 0.1, torch.randn(out, r) * 0.02


@pytest.mark.parametrize(("fmt", "double_quant"), CASES, ids=lambda v: str(v))
def test_kernel_equals_reference(fmt, double_quant):
    """fp32: bit-identical to the reference; bf16: the reference rounded once (as the interpreter's store rounds)."""
    w, a, b = _factors(out=19, n=256, r=5)  # odd row count: masked tiles at the bottom edge
    imatrix = torch.rand(w.shape[1]) + 0.5 if FORMATS[fmt].takes_imatrix else None  # the IQ types require one
    base = QuantWeight.quantize(w, fmt, imatrix, double_quant=double_quant)
    ref = merge_reference(base, a, b, scale=1.75)
    got = merge_triton(base, a, b, scale=1.75)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    got16 = merge_triton(base, a, b, scale=1.75, dtype=torch.bfloat16)
    assert torch.equal(got16, interpreter_downcast(ref, torch.bfloat16))


def test_reference_is_dequant_plus_delta():
    """The reference adds scale * B @ A to exactly the codec's dequantized base; the CPU BLAS path agrees to
    float32 rounding."""
    w, a, b = _factors(out=64, n=256, r=8)
    base = QuantWeight.quantize(w, "q4_k")
    ref = merge_reference(base, a, b, scale=0.5)
    want = base.dequantize(torch.float64).double() + 0.5 * (b.double() @ a.double())
    assert (ref.double() - want).abs().max() < 1e-6
    assert (merge_blas(base, a, b, scale=0.5) - ref).abs().max() < 1e-6
    assert not torch.equal(ref, base.dequantize(torch.float32))
