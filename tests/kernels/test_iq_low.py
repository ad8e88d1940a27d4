"""The 1- to 3-bit lattice i-quants (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) against llama.cpp and
gguf-py.

Bytes are compared with llama.cpp's own ``ggml_quantize_chunk`` (through llama-cpp-python), for the PyTorch
reference and for the C kernels, on heavy-tailed random weights and on SmolLM2 rows, with an imatrix and (for the
types llama.cpp makes without one) without; every block must be identical. Dequantization is compared with
``gguf.quants``; the lattices themselves with gguf-py's grid tables.
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from helpers.reference import ggml_quantize, interpreter_downcast
from quantforge.kernels import _cpu_fast, _iq_grids, tiles
from quantforge.kernels._triton import triton_available

from quantforge.errors import ImatrixRequired, UnsupportedFormat
from quantforge.formats import get_format

TYPES = ["iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s"]
NEEDS_IMATRIX = {"iq1_s", "iq2_xxs", "iq2_xs"}
CASES = [(n, im) for n in TYPES for im in (True, False) if im or n not in NEEDS_IMATRIX]
CASE_IDS = [f"{n}-{'imatrix' if im else 'no_imatrix'}" for n, im in CASES]
LATTICES = {"iq2_xxs": ("iq2_256", gguf.quants.IQ2_XXS), "iq2_xs": ("iq2_512", gguf.quants.IQ2_XS),
            "iq3_xxs": ("iq3_256", gguf.quants.IQ3_XXS), "iq1_s": ("iq1_2048", gguf.quants.IQ1_S),
            "iq1_m": ("iq1_2048", gguf.quants.IQ1_M), "iq3_s": ("iq3_512", gguf.quants.IQ3_S),
            "iq2_s": ("iq2_1024", gguf.quants.IQ2_S)}


def heavy_tailed(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """``randn * exp(randn)`` with an all-zero row and super-block, tiny values, a constant run, a Cauchy-like row,
    signed zeros, alternating signs and a block of 1e-20 values (below IQ3_XXS's skip threshold); the all-zero
    32-weight block shifts the following IQ3_S codes, as in llama.cpp."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g) * torch.exp(torch.randn(rows, n, generator=g))
    w[0] = 0.0
    w[1, 256:512] = 0.0
    w[1, 32:64] = 0.0
    w[2] *= 1e-6
    w[3, :256] = 0.25
    w[4] = torch.randn(n, generator=g) / torch.rand(n, generator=g).clamp(min=1e-3)
    w[5, 64:96] = torch.randn(32, generator=g) * 1e-20
    w[6, 96:128] = torch.randn(32, generator=g).abs() + 3.0
    w[7, :32] = -0.0
    w[7, 40:48] = torch.tensor([0.0, -0.0] * 4)
    w[8, :32] = torch.tensor([1.5, -1.5] * 16)
    w[8, 32:64] = torch.tensor([-2.0, 2.0] * 16)
    return w


def imatrix_for(n: int, seed: int = 1) -> torch.Tensor:
    """Log-normal importances with one 32-column run of zeros."""
    g = torch.Generator().manual_seed(seed)
    im = torch.exp(2 * torch.randn(n, generator=g))
    im[32:64] = 0.0
    return im


def bad_blocks(a: np.ndarray, b: np.ndarray, width: int) -> str:
    bad = np.nonzero((a.reshape(-1, width) != b.reshape(-1, width)).any(axis=1))[0]
    return "none" if bad.size == 0 else f"{bad.size} of {a.size // width} blocks differ, first {bad[0]}"


def use_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Select the PyTorch reference (``torch``) or the C kernels (``c``, which must be built)."""
    monkeypatch.setenv(_cpu_fast.ENV, path)
    if path == "c" and not _cpu_fast.iq_enabled(torch.zeros(1)):
        if os.environ.get("CI") == "true":
            pytest.fail(f"the C i-quant kernels are not built: {_cpu_fast.load_error()}")
        pytest.skip("the C quantizers were not built (no C compiler at install time)")


def check_against_llama_cpp(name: str, w: torch.Tensor, im: torch.Tensor | None) -> None:
    fmt = get_format(name)
    ours = fmt.load_codec().quantize(w, im).numpy()
    theirs = ggml_quantize(w.numpy(), fmt.ggml_type, None if im is None else im.numpy())
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs), f"{name}: {bad_blocks(ours, theirs, fmt.type_size)}"


@pytest.mark.parametrize("name", TYPES)
def test_lattices_match_gguf_py(name):
    lattice, cls = LATTICES[name]
    cls.init_grid()
    ref = np.asarray(cls.grid, dtype=np.float32).reshape(-1, cls.grid_shape[1])
    assert np.array_equal(_iq_grids.dequant_grid(lattice).numpy(), ref)
    assert bytes(_iq_grids.ksigns().to(torch.uint8).tolist()) == gguf.quants.IQ2_XXS.ksigns


@pytest.mark.parametrize("path", ["torch", "c"])
@pytest.mark.parametrize(("name", "use_imatrix"), CASES, ids=CASE_IDS)
def test_random_matches_llama_cpp(name, use_imatrix, path, monkeypatch):
    use_path(path, monkeypatch)
    w = heavy_tailed(10, 768)
    check_against_llama_cpp(name, w, imatrix_for(768) if use_imatrix else None)


@pytest.fixture(scope="module")
def smollm2_down(smollm2_dir) -> dict[str, torch.Tensor]:
    """The first 32 rows of two SmolLM2 ``down_proj`` weights (1536 wide), as float32."""
    from safetensors import safe_open

    keys = ("model.layers.0.mlp.down_proj.weight", "model.layers.29.mlp.down_proj.weight")
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k)[:32].to(torch.float32) for k in keys}


@pytest.mark.parametrize("path", ["torch", "c"])
@pytest.mark.parametrize(("name", "use_imatrix"), CASES, ids=CASE_IDS)
def test_smollm2_matches_llama_cpp(name, use_imatrix, path, smollm2_down, monkeypatch):
    """Real weights; the PyTorch reference on 2 rows of each tensor, the C kernels on all 32."""
    use_path(path, monkeypatch)
    for i, w in enumerate(smollm2_down.values()):
        w = w[:2] if path == "torch" else w
        check_against_llama_cpp(name, w, imatrix_for(w.shape[1], seed=10 + i) if use_imatrix else None)


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_gguf_py(name):
    fmt = get_format(name)
    w = heavy_tailed(10, 512, seed=3)
    im = imatrix_for(512, seed=4)
    for data in (fmt.load_codec().quantize(w, im).numpy(), ggml_quantize(w.numpy(), fmt.ggml_type, im.numpy())):
        deq = fmt.load_codec().dequantize(torch.from_numpy(data)).numpy()
        ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(fmt.ggml_type)).reshape(deq.shape)
        assert np.array_equal(deq, ref), f"{name}: {bad_blocks(deq, ref, fmt.block_size)}"
        assert fmt.dequantize(torch.from_numpy(data), torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("name", sorted(NEEDS_IMATRIX))
def test_imatrix_required(name):
    w = torch.randn(2, 256)
    with pytest.raises(ImatrixRequired, match="importance matrix"):
        get_format(name).load_codec().quantize(w)
    with pytest.raises(ImatrixRequired):
        get_format(name).quantize(w)


@pytest.mark.parametrize("name", TYPES)
def test_threads_and_chunks_keep_bytes(name, monkeypatch):
    """Rows split over worker threads and over small chunks: the same bytes as one pass of the reference."""
    w = heavy_tailed(9, 512, seed=5)
    im = imatrix_for(512, seed=6)
    use_path("torch", monkeypatch)
    ref = get_format(name).load_codec().quantize(w, im)
    use_path("c", monkeypatch)
    monkeypatch.setattr(_cpu_fast, "_SEARCH_MIN_ELEMENTS", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert torch.equal(get_format(name).load_codec().quantize(w, im), ref)


@pytest.mark.parametrize("name", TYPES)
def test_shape_errors(name):
    c = get_format(name).load_codec()
    im = torch.ones(384)
    with pytest.raises(UnsupportedFormat):
        c.quantize(torch.zeros(2, 384), im)
    with pytest.raises(UnsupportedFormat):
        c.quantize(torch.zeros(2, 256), torch.ones(257))
    with pytest.raises(UnsupportedFormat):
        c.dequantize(torch.zeros(2, get_format(name).type_size + 1, dtype=torch.uint8))



@pytest.mark.skipif(not triton_available(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", TYPES)
def test_triton_tile_matches_reference(name, dtype):
    """The registry's tile through the standalone launcher, and through ``tiles.dequantize`` with its default aux."""
    fmt = get_format(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = fmt.load_codec().quantize(heavy_tailed(10, 512, seed=7)[4:7], imatrix_for(512, seed=8)).to(device)
    ref = fmt.load_codec().dequantize(data)
    out = fmt.load_codec().dequantize_triton(data, dtype)
    assert out.dtype == dtype and torch.equal(out, interpreter_downcast(ref, dtype))
    assert torch.equal(tiles.dequantize(fmt, data), ref)
