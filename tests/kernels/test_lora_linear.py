"""Fused dequant + LoRA linear (forward and backward) against its PyTorch reference, for every tiled format.

Shapes are small and odd: 48 output rows (a partial row tile), K not a multiple of the 64-wide reduction tile
where the format's block allows it, M = 1 and M = 5 tokens, rank 4 (padded to 16 inside the kernel). Runs
under ``TRITON_INTERPRET=1`` on CPU (tests/conftest.py sets it) or natively on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from quantforge.kernels import lora_linear as ll
from quantforge.kernels._triton import triton_available
from quantforge.kernels.qweight import QuantWeight

from quantforge.errors import UnsupportedFormat
from quantforge.formats import FORMATS, get_format

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(n, False) for n in sorted(n for n, f in FORMATS.items() if f.tile is not None)] + [
    ("nf4", True), ("fp4", True)]
#: Input features per block size: 40 and 96 are not multiples of the 64-wide reduction tile; K-quants span four.
K_FOR_BLOCK = {1: 40, 32: 96, 64: 192, 256: 256}
N_OUT, RANK, SCALE = 48, 4, 0.5
#: fp32: relative error (Frobenius) of output and gradients (measured <= 4e-7).
FP32_REL = 1e-4
#: bf16: max |error| over max |fp32 reference|, in bf16 epsilons (2^-8): W, the LoRA intermediate and the output
#: each round once (the CPU interpreter truncates instead of rounding); measured up to 2.4 eps on CPU.
BF16_EPS = 3


def _weight(name: str, double_quant: bool = False) -> QuantWeight:
    fmt = get_format(name)
    k = K_FOR_BLOCK[fmt.block_size]
    imatrix = torch.rand(k) + 0.1 if fmt.takes_imatrix else None
    return QuantWeight.quantize(torch.randn(N_OUT, k) * 0.1, name, imatrix, double_quant=double_quant).to(DEVICE)


def _inputs(k: int, m: int, dtype: torch.dtype) -> list[torch.Tensor]:
    x = torch.randn(m, k)
    a = torch.randn(RANK, k) * 0.1
    b = torch.randn(N_OUT, RANK) * 0.1
    bias = torch.randn(N_OUT)
    return [t.to(device=DEVICE, dtype=dtype) for t in (x, a, b, bias)]


def _run(fn, weight: QuantWeight, tensors: list[torch.Tensor], probe: torch.Tensor, **kw) -> list[torch.Tensor]:
    """Output and gradients of ``sum(fn(...) * probe)`` for x, A, B and the bias."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    x, a, b, bias = leaves
    y = fn(x, weight, a, b, SCALE, bias, **kw)
    (y.float() * probe).sum().backward()
    return [y.detach().float()] + [t.grad.float() for t in leaves]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("name, double_quant", CASES, ids=str)
def test_fp32_output_and_grads_match_reference(name: str, double_quant: bool) -> None:
    """Fused kernel == dequantize then matmul (the reference), in float32."""
    w = _weight(name, double_quant)
    tensors = _inputs(w.shape[1], 5, torch.float32)
    probe = torch.randn(5, N_OUT, device=DEVICE)
    got = _run(ll.lora_linear, w, tensors, probe)
    want = _run(ll.lora_linear_reference, w, tensors, probe)
    for what, g, r in zip(("y", "dx", "dA", "dB", "dbias"), got, want, strict=True):
        assert _rel(g, r) < FP32_REL, f"{name} {what}: {_rel(g, r):.2e}"


@pytest.mark.parametrize("name, double_quant", [("nf4", True), ("q4_k", False), ("q6_k", False), ("q4_0", False),
                                                ("iq4_xs", False), ("bf16", False)], ids=str)
def test_bf16_within_bf16_rounding_of_fp32_reference(name: str, double_quant: bool) -> None:
    w = _weight(name, double_quant)
    tensors = _inputs(w.shape[1], 5, torch.bfloat16)
    probe = torch.randn(5, N_OUT, device=DEVICE)
    got = _run(ll.lora_linear, w, tensors, probe)
    fmt32 = "f32" if w.format.family.value == "float" else w.fmt
    w32 = QuantWeight(fmt32, w.data.float() if fmt32 == "f32" else w.data, w.shape, w.extra)
    want = _run(ll.lora_linear_reference, w32, [t.float() for t in tensors], probe)
    for what, g, r in zip(("y", "dx", "dA", "dB", "dbias"), got, want, strict=True):
        err = ((g - r).abs().max() / r.abs().max()).item()
        assert err <= BF16_EPS * 2.0**-8, f"{name} {what}: {err / 2.0**-8:.2f} bf16 eps"


@pytest.mark.parametrize("name", ["q4_k", "nf4", "q8_0"])
def test_one_token_with_separate_lora_input(name: str) -> None:
    """M = 1 (decode), a leading batch dim, and dropout-style ``lora_x``, whose gradient is the LoRA path's."""
    w = _weight(name, double_quant=True)
    x, a, b, bias = _inputs(w.shape[1], 1, torch.float32)
    lora_x = (x * (torch.rand_like(x) > 0.3) / 0.7).detach()
    probe = torch.randn(1, 1, N_OUT, device=DEVICE)
    outs = []
    for fn in (ll.lora_linear, ll.lora_linear_reference):
        leaves = [t.detach().clone().requires_grad_() for t in (x[None], lora_x[None], a, b)]
        y = fn(leaves[0], w, leaves[2], leaves[3], SCALE, None, lora_x=leaves[1])
        (y * probe).sum().backward()
        outs.append([y.detach()] + [t.grad for t in leaves])
    for what, g, r in zip(("y", "dx", "dlora_x", "dA", "dB"), *outs, strict=True):
        assert _rel(g, r) < FP32_REL, f"{name} {what}: {_rel(g, r):.2e}"


def test_plain_quantized_linear_without_lora() -> None:
    w = _weight("q5_k")
    x = torch.randn(3, w.shape[1], device=DEVICE, requires_grad=True)
    y = ll.lora_linear(x, w, None, None, SCALE)
    y.sum().backward()
    ref = x.detach() @ w.dequantize(torch.float32).t()
    assert _rel(y.detach(), ref) < FP32_REL
    assert _rel(x.grad, w.dequantize(torch.float32).sum(0).expand_as(x)) < FP32_REL


def test_transient_path_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dequantize-to-buffer path (CUDA at many tokens, or without Triton) has the same gradients."""
    monkeypatch.setattr(ll, "use_fused", lambda x, weight: False)
    w = _weight("nf4", double_quant=True)
    tensors = _inputs(w.shape[1], 5, torch.float32)
    probe = torch.randn(5, N_OUT, device=DEVICE)
    got = _run(ll.lora_linear, w, tensors, probe)
    want = _run(ll.lora_linear_reference, w, tensors, probe)
    for g, r in zip(got, want, strict=True):
        assert _rel(g, r) < FP32_REL


@pytest.mark.parametrize("fused", [True, False])
def test_saved_state_holds_no_copy_of_the_weight(fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ll, "use_fused", lambda x, weight: fused)
    w = _weight("q4_0")
    x, a, b, _ = _inputs(w.shape[1], 5, torch.float32)
    y = ll.lora_linear(x.requires_grad_(), w, a.requires_grad_(), b.requires_grad_(), SCALE)
    shapes = [tuple(t.shape) for t in y.grad_fn.saved_tensors if t is not None]
    assert tuple(w.shape) not in shapes and (w.shape[1], w.shape[0]) not in shapes


def test_bad_shapes_are_refused() -> None:
    w = _weight("q4_0")
    x, a, b, _ = _inputs(w.shape[1], 2, torch.float32)
    with pytest.raises(UnsupportedFormat, match="features"):
        ll.lora_linear(x[:, :32], w, a, b, SCALE)
    with pytest.raises(UnsupportedFormat, match="lora_b"):
        ll.lora_linear(x, w, a, b[:, :2], SCALE)
    with pytest.raises(UnsupportedFormat, match="together"):
        ll.lora_linear(x, w, a, None, SCALE)
