"""Legacy (Q4_0, Q4_1, Q5_0, Q5_1) and IQ4 (IQ4_NL, IQ4_XS) codecs against gguf-py and llama.cpp, plus their
Triton dequantize kernels.

Bytes are compared with llama.cpp's own ``ggml_quantize_chunk`` (through llama-cpp-python), without an imatrix
(ggml's ref paths) and with one (the ``_impl`` paths); dequantization with ``gguf.quants``. The Triton kernels run
under ``TRITON_INTERPRET=1`` on CPU (set before any kernel module is imported: ``triton.jit`` picks the
interpreter at decoration time).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from quantforge.kernels._triton import triton_available  # noqa: E402

from quantforge.errors import InputError, UnsupportedFormat  # noqa: E402
from quantforge.formats import get_format  # noqa: E402
from helpers.reference import ggml_quantize, interpreter_downcast, weighted_sq_error  # noqa: E402

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "iq4_xs"]

# Fraction of blocks whose bytes must equal llama.cpp's. GGUF.md §0: summation order and FMA contraction can flip
# tie-level decisions between correct implementations. Ours follows ggml's float32 operation order with sequential
# sums and correctly rounded sqrt, and measured 100% for every type, with and without an imatrix, on these tensors
# against the pinned llama-cpp-python's libggml-base (built without FMA), so all must match.
MIN_IDENTICAL = 1.0
# Weighted squared error of ours relative to llama.cpp's on the same tensor (measured 1.000000 for every type).
MAX_ERROR_RATIO = 1.0


def codec(name: str):
    return get_format(name).load_codec()


def heavy_tailed(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """``randn * exp(randn)`` with an all-zero row, all-zero blocks, tiny values, a constant run, a t(2.5) row,
    signed zeros and blocks whose largest magnitude appears with both signs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g) * torch.exp(torch.randn(rows, n, generator=g))
    w[0] = 0.0
    w[1, 256:512] = 0.0
    w[1, 32:64] = 0.0
    w[2] *= 1e-6
    w[3, :256] = 0.25
    w[4] = torch.distributions.StudentT(2.5).sample((n,))
    w[5, 64:96] = torch.randn(32, generator=g) * 1e-20
    w[6, 96:128] = torch.randn(32, generator=g).abs() + 3.0
    w[7, :32] = -0.0
    w[7, 32:64] = torch.randn(32, generator=g).abs()
    w[7, 40:48] = torch.tensor([0.0, -0.0] * 4)
    w[7, 64:96] = torch.tensor([-0.0, 0.0] * 16)
    w[8, :32] = torch.tensor([1.5, -1.5] * 16)
    w[8, 32:64] = torch.tensor([-2.0, 2.0] * 16)
    return w


def imatrix_for(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(n, generator=g))


def first_bad_block(a: np.ndarray, b: np.ndarray, width: int) -> str:
    bad = np.nonzero((a.reshape(-1, width) != b.reshape(-1, width)).any(axis=1))[0]
    return "none" if bad.size == 0 else f"{bad.size} differ, first block {bad[0]}"


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return heavy_tailed(32, 1024)


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_matches_gguf_py(name, weight):
    fmt = get_format(name)
    ours = codec(name).quantize(weight)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == fmt.byte_shape(tuple(weight.shape))
    deq = codec(name).dequantize(ours).numpy()
    ref = gguf.quants.dequantize(ours.numpy(), gguf.GGMLQuantizationType(fmt.ggml_type)).reshape(deq.shape)
    assert np.array_equal(deq, ref), (
        f"{name}: gguf-py dequantizes our bytes differently, {first_bad_block(deq, ref, fmt.block_size)}"
    )
    theirs = ggml_quantize(weight.numpy(), fmt.ggml_type)
    deq2 = codec(name).dequantize(torch.from_numpy(theirs)).numpy()
    ref2 = gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType(fmt.ggml_type)).reshape(deq2.shape)
    assert np.array_equal(deq2, ref2), (
        f"{name}: llama.cpp bytes decode differently, {first_bad_block(deq2, ref2, fmt.block_size)}"
    )


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("name", TYPES)
def test_matches_llama_cpp(name, use_imatrix, weight, record_property):
    fmt = get_format(name)
    im = imatrix_for(weight.shape[1]) if use_imatrix else None
    ours = codec(name).quantize(weight, im).numpy()
    theirs = ggml_quantize(weight.numpy(), fmt.ggml_type, None if im is None else im.numpy())
    same = (ours.reshape(-1, fmt.type_size) == theirs.reshape(-1, fmt.type_size)).all(axis=1).mean()
    e_ours = weighted_sq_error(weight, codec(name).dequantize(torch.from_numpy(ours)), im)
    e_theirs = weighted_sq_error(weight, codec(name).dequantize(torch.from_numpy(theirs)), im)
    record_property("identical_blocks", float(same))
    record_property("error_ratio", e_ours / e_theirs)
    path = "imatrix" if use_imatrix else "ref"
    bad = first_bad_block(ours, theirs, fmt.type_size)
    msg = f"{name} {path}: identical blocks {same:.4f} ({bad}), error ratio {e_ours / e_theirs:.6f}"
    assert same >= MIN_IDENTICAL, msg
    assert e_ours <= MAX_ERROR_RATIO * e_theirs, msg


@pytest.mark.parametrize("name", [t for t in TYPES if t != "iq4_nl"])
def test_imatrix_zero_over_a_block_matches_llama_cpp(name):
    fmt = get_format(name)
    w = heavy_tailed(10, 512, seed=10)
    im = imatrix_for(512, seed=11)
    im[32:64] = 0.0
    im[300:310] = 0.0
    ours = codec(name).quantize(w, im).numpy()
    theirs = ggml_quantize(w.numpy(), fmt.ggml_type, im.numpy())
    same = (ours.reshape(-1, fmt.type_size) == theirs.reshape(-1, fmt.type_size)).all(axis=1).mean()
    assert same >= MIN_IDENTICAL, f"{name}: identical blocks {same:.4f}"


def test_iq4_nl_rejects_an_imatrix_zero_over_a_block():
    im = imatrix_for(256, seed=12)
    im[64:96] = 0.0
    with pytest.raises(InputError):
        codec("iq4_nl").quantize(heavy_tailed(10, 256, seed=13), im)


@pytest.mark.parametrize("name", ["q4_0", "q5_1", "iq4_nl", "iq4_xs"])
def test_row_chunks_do_not_change_bytes(name, monkeypatch):
    from quantforge.kernels import _legacy_common

    w = heavy_tailed(12, 512, seed=3)
    im = imatrix_for(512, seed=4)
    whole = codec(name).quantize(w, im)
    for key in list(_legacy_common.CHUNK_ELEMS):
        monkeypatch.setitem(_legacy_common.CHUNK_ELEMS, key, 1000)
    assert torch.equal(codec(name).quantize(w, im), whole)


@pytest.mark.parametrize("shape", [(32, 2), (32, 4097), (256, 96), (1536, 3), (1536, 1)])
def test_seqsum_cols_adds_left_to_right(shape):
    from quantforge.kernels._legacy_common import seqsum_cols

    g = torch.Generator().manual_seed(9)
    t = torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))
    acc = t[0] + 0.0
    for row in t[1:]:
        acc += row
    assert torch.equal(seqsum_cols(t), acc)


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.skipif(not triton_available(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("name", TYPES)
def test_triton_dequantize_matches_reference(name, rows, dtype):
    fmt = get_format(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = (
        heavy_tailed(10, 2 * max(fmt.block_size, 64), seed=5)[6 : 6 + rows]
        if rows == 3
        else heavy_tailed(10, 512, seed=6)[4:5]
    )
    data = codec(name).quantize(w).to(device)
    ref = codec(name).dequantize(data)
    out = codec(name).dequantize_triton(data, DTYPES[dtype])
    assert out.shape == ref.shape and out.dtype == DTYPES[dtype]
    assert torch.equal(out, interpreter_downcast(ref, DTYPES[dtype]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("name", TYPES)
def test_cuda_quantize_matches_cpu(name, use_imatrix):
    w = heavy_tailed(16, 512, seed=7)
    im = imatrix_for(512, seed=8) if use_imatrix else None
    cpu = codec(name).quantize(w, im)
    gpu = codec(name).quantize(w.cuda(), None if im is None else im.cuda())
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("name", TYPES)
def test_shape_errors(name):
    fmt = get_format(name)
    c = codec(name)
    with pytest.raises(UnsupportedFormat):
        c.quantize(torch.zeros(2, fmt.block_size + 16))
    with pytest.raises(UnsupportedFormat):
        c.quantize(torch.zeros(fmt.block_size))
    with pytest.raises(UnsupportedFormat):
        c.quantize(torch.zeros(2, fmt.block_size), torch.ones(fmt.block_size + 1))
    with pytest.raises(UnsupportedFormat):
        c.dequantize(torch.zeros(2, fmt.type_size + 1, dtype=torch.uint8))
    with pytest.raises(UnsupportedFormat):
        fmt.quantize(torch.zeros(2, fmt.block_size * 3 // 2))
