"""The ternary types TQ1_0 and TQ2_0 against llama.cpp and gguf-py.

Bytes are compared with llama.cpp's own ``ggml_quantize_chunk`` (through llama-cpp-python) on heavy-tailed random
weights with edge cases (all-zero, exact halves, a subnormal maximum, an infinite weight) and on SmolLM2 rows;
every block must be identical. Dequantization equals ``gguf.quants``; the Triton tile equals the PyTorch reference.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from helpers.reference import ggml_quantize, interpreter_downcast
from quantforge.kernels import tiles
from quantforge.kernels._triton import triton_available

from quantforge.errors import UnsupportedFormat
from quantforge.formats import get_format

TYPES = ["tq1_0", "tq2_0"]


def ternary_weights(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """``randn * exp(randn)`` plus rows that hit the rounding edges: all zeros, exact +-0.5 of the maximum,
    ternary values (a BitNet weight times a scale), a subnormal maximum (``1 / d`` overflows), an infinity,
    signed zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g) * torch.exp(torch.randn(rows, n, generator=g))
    w[0] = 0.0
    w[1, :256] = torch.tensor([1.0, -0.5, 0.5, -1.0] * 64)
    w[2] = torch.randint(-1, 2, (n,), generator=g).to(torch.float32) * 0.0123
    w[3, :256] = torch.randn(256, generator=g) * 1e-39
    w[4, 7] = float("inf")
    w[5, :64] = -0.0
    w[6, 256:512] = torch.tensor([0.49999997, -0.50000006, 1.0, 0.5000001] * 64)
    return w


def bad_blocks(a: np.ndarray, b: np.ndarray, width: int) -> str:
    bad = np.nonzero((a.reshape(-1, width) != b.reshape(-1, width)).any(axis=1))[0]
    return "none" if bad.size == 0 else f"{bad.size} of {a.size // width} blocks differ, first {bad[0]}"


def check_against_llama_cpp(name: str, w: torch.Tensor, im: torch.Tensor | None = None) -> np.ndarray:
    fmt = get_format(name)
    ours = fmt.load_codec().quantize(w, im).numpy()
    theirs = ggml_quantize(w.numpy(), fmt.ggml_type, None if im is None else im.numpy())
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs), f"{name}: {bad_blocks(ours, theirs, fmt.type_size)}"
    assert np.array_equal(fmt.quantize(w, im).numpy(), ours)
    return ours


@pytest.mark.parametrize("name", TYPES)
def test_random_matches_llama_cpp(name):
    w = ternary_weights(12, 768)
    check_against_llama_cpp(name, w)
    check_against_llama_cpp(name, w, torch.rand(768) + 0.1)  # the imatrix is ignored, as in ggml


@pytest.mark.parametrize("name", TYPES)
def test_smollm2_matches_llama_cpp(name, smollm2_dir):
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        for key in ("model.layers.0.mlp.down_proj.weight", "model.layers.29.mlp.down_proj.weight"):
            check_against_llama_cpp(name, f.get_slice(key)[:64].to(torch.float32))


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_gguf_py(name):
    fmt = get_format(name)
    w = ternary_weights(12, 512, seed=3)
    w[4, 7] = 1.0  # keep every value finite for an exact comparison
    for data in (fmt.load_codec().quantize(w).numpy(), ggml_quantize(w.numpy(), fmt.ggml_type)):
        deq = fmt.load_codec().dequantize(torch.from_numpy(data)).numpy()
        ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(fmt.ggml_type)).reshape(deq.shape)
        assert np.array_equal(deq, ref), f"{name}: {bad_blocks(deq, ref, fmt.block_size)}"
    assert fmt.dequantize(torch.from_numpy(data), torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("name", TYPES)
def test_every_byte_decodes_like_gguf_py(name):
    """Arbitrary bytes (not only what the quantizer writes), finite fp16 scales."""
    fmt = get_format(name)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (4, 2 * fmt.type_size), generator=g, dtype=torch.uint8)
    data.view(-1, fmt.type_size)[:, -2:] = torch.tensor([0x66, 0x2E], dtype=torch.uint8)  # d = 0.1
    deq = fmt.load_codec().dequantize(data).numpy()
    ref = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType(fmt.ggml_type)).reshape(deq.shape)
    assert np.array_equal(deq, ref)


@pytest.mark.parametrize("name", TYPES)
def test_round_trip_of_ternary_weights_is_exact(name):
    """A BitNet-style weight (trits times an fp16-exact scale, the scale reached in every block) comes back as is."""
    g = torch.Generator().manual_seed(2)
    t = torch.randint(-1, 2, (4, 512), generator=g).to(torch.float32)
    t[:, ::256] = 1.0
    w = t * 0.015625
    c = get_format(name).load_codec()
    assert torch.equal(c.dequantize(c.quantize(w)), w)


@pytest.mark.parametrize("name", TYPES)
def test_shape_errors(name):
    c = get_format(name).load_codec()
    with pytest.raises(UnsupportedFormat):
        c.quantize(torch.zeros(2, 384))
    with pytest.raises(UnsupportedFormat):
        c.quantize(torch.zeros(2, 256), torch.ones(257))
    with pytest.raises(UnsupportedFormat):
        c.dequantize(torch.zeros(2, get_format(name).type_size + 1, dtype=torch.uint8))


@pytest.mark.skipif(not triton_available(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", TYPES)
def test_triton_tile_matches_reference(name, dtype):
    fmt = get_format(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = fmt.load_codec().quantize(ternary_weights(7, 768, seed=7)[5:7]).to(device)
    ref = fmt.load_codec().dequantize(data)
    out = fmt.load_codec().dequantize_triton(data, dtype)
    assert out.dtype == dtype and torch.equal(out, interpreter_downcast(ref, dtype))
    assert torch.equal(tiles.dequantize(fmt, data), ref)
