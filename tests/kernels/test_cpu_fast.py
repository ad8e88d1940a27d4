"""The C CPU quantizers (``kernels/_cquant.c`` through ``kernels/_cpu_fast.py``) against the PyTorch reference
codecs and llama.cpp.

Every type must give exactly the reference's bytes (``QUANTFORGE_CPU_KERNELS=torch`` selects the reference) and
llama.cpp's own ``ggml_quantize_chunk`` bytes, with and without an imatrix, on heavy-tailed weights with all-zero
rows and blocks, tiny and subnormal-squared values, constant runs, signed zeros, largest magnitudes with both signs,
outliers, weights up to 1e11, values on a coarse grid (exact rounding ties) and real SmolLM2 rows. The extension
must have been built (``pip install`` with a C compiler present): these tests fail, not skip, without it.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from quantforge.kernels import _cpu_fast

from quantforge.errors import InputError, UnsupportedFormat
from quantforge.formats import get_format
from helpers.reference import ggml_quantize

TYPES = list(_cpu_fast.TYPES)


def weights(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g) * torch.exp(torch.randn(rows, n, generator=g))
    w[0] = 0.0
    w[1, 256:512] = 0.0
    w[1, 32:64] = 0.0
    w[2] *= 1e-6
    w[3, :256] = 0.25
    w[4] = torch.distributions.StudentT(2.5).sample((n,))
    w[5, 64:96] = torch.randn(32, generator=g) * 1e-20
    w[5, 96:128] = torch.randn(32, generator=g) * 1e-25
    w[6, 96:128] = torch.randn(32, generator=g).abs() + 3.0
    w[7, :32] = -0.0
    w[7, 32:64] = torch.randn(32, generator=g).abs()
    w[7, 40:48] = torch.tensor([0.0, -0.0] * 4)
    w[7, 64:96] = torch.tensor([-0.0, 0.0] * 16)
    w[7, 96:128] = -torch.randn(32, generator=g).abs()
    w[7, 100:104] = torch.tensor([-0.0, 0.0, -0.0, 0.0])
    w[8, :32] = torch.tensor([1.5, -1.5] * 16)
    w[8, 32:64] = torch.tensor([-2.0, 2.0] * 16)
    w[9] = torch.randint(-8, 8, (n,), generator=g).float() * 0.25  # a coarse grid: exact ties after scaling
    w[10] = torch.randint(-3, 4, (n,), generator=g).float() * 0.5
    w[11, : n // 2] = 1e4 * torch.randn(n // 2, generator=g)
    w[11, n // 2 :] = 1e11 * torch.randn(n - n // 2, generator=g)  # the largest scale where no float32 sum overflows
    w[3, [n // 2 + 5, n // 2 + 40, n - 3]] = torch.tensor([40.0, -75.0, 1e3])  # a few outliers among small weights
    return w


def imatrix(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(n, generator=g))


def reference(name: str, w: torch.Tensor, im: torch.Tensor | None, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setenv(_cpu_fast.ENV, "torch")
        assert not _cpu_fast.enabled(w)
        return get_format(name).quantize(w, im)


def bad_blocks(a: np.ndarray, b: np.ndarray, width: int) -> str:
    bad = np.nonzero((a.reshape(-1, width) != b.reshape(-1, width)).any(axis=1))[0]
    return f"{bad.size} blocks differ, first {bad[:5].tolist()}"


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return weights(13, 1024), imatrix(1024)


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_reference_and_llama_cpp(name, use_imatrix, data, monkeypatch):
    fmt = get_format(name)
    w, im = data
    im = im if use_imatrix else None
    assert _cpu_fast.enabled(w)
    ours = get_format(name).quantize(w, im)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == fmt.byte_shape(tuple(w.shape))
    ref = reference(name, w, im, monkeypatch)
    assert torch.equal(ours, ref), f"{name} vs reference: {bad_blocks(ours.numpy(), ref.numpy(), fmt.type_size)}"
    theirs = ggml_quantize(w.numpy(), fmt.ggml_type, None if im is None else im.numpy())
    assert np.array_equal(ours.numpy(), theirs), (
        f"{name} vs llama.cpp: {bad_blocks(ours.numpy(), theirs, fmt.type_size)}")


SMOLLM2_TENSORS = ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight",
                   "model.layers.7.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
                   "model.layers.29.mlp.down_proj.weight")


@pytest.fixture(scope="module")
def smollm2_rows(smollm2_dir) -> dict[str, torch.Tensor]:
    """The first 48 rows of a few SmolLM2 tensors (576 and 1536 wide), as float32."""
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k)[:48].to(torch.float32) for k in SMOLLM2_TENSORS}


@pytest.mark.parametrize("name", TYPES)
def test_smollm2_rows_equal_reference(name, smollm2_rows, monkeypatch):
    """Real weights (bf16, on a coarse grid: the fixture comes from a Q4_1 GGUF), with and without an imatrix."""
    fmt = get_format(name)
    checked = 0
    for key, w in smollm2_rows.items():
        if not fmt.fits(w.shape[1]):
            continue
        for im in (None, imatrix(w.shape[1], seed=len(key))):
            ours = fmt.quantize(w, im)
            ref = reference(name, w, im, monkeypatch)
            assert torch.equal(ours, ref), f"{name} {key}: {bad_blocks(ours.numpy(), ref.numpy(), fmt.type_size)}"
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("name", TYPES)
def test_odd_shapes_and_threads(name, monkeypatch):
    """Odd row counts, one row, rows split over worker threads: same bytes as the reference."""
    fmt = get_format(name)
    n = 2 * max(fmt.block_size, 256)
    threads = torch.get_num_threads()
    monkeypatch.setattr(_cpu_fast, "_SEARCH_MIN_ELEMENTS", 1)
    monkeypatch.setattr(_cpu_fast, "PARALLEL_MIN_ELEMENTS", dict.fromkeys(_cpu_fast.PARALLEL_MIN_ELEMENTS, 1))
    try:
        for rows, seed in ((1, 3), (7, 4), (12, 5)):
            w = weights(12, n, seed)[12 - rows:]
            for im in (None, imatrix(n, seed)):
                ref = reference(name, w, im, monkeypatch)
                for t in (1, 2, 3):
                    torch.set_num_threads(t)
                    got = fmt.quantize(w, im)
                    assert torch.equal(got, ref), f"{name} rows={rows} threads={t}: " + bad_blocks(
                        got.numpy(), ref.numpy(), fmt.type_size)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", [t for t in TYPES if t not in ("q8_0", "iq4_nl")])
def test_imatrix_zero_over_blocks(name, monkeypatch):
    w = weights(12, 512, seed=10)
    im = imatrix(512, seed=11)
    im[32:64] = 0.0
    im[300:310] = 0.0
    fmt = get_format(name)
    ours = fmt.quantize(w, im)
    assert torch.equal(ours, reference(name, w, im, monkeypatch))
    assert np.array_equal(ours.numpy(), ggml_quantize(w.numpy(), fmt.ggml_type, im.numpy()))


@pytest.mark.parametrize("name", TYPES)
def test_extreme_rows_equal_reference(name, monkeypatch):
    """Rows below the smallest normal float and rows of ~1e13: the reference's bytes (llama.cpp's differ from both
    for some types there: float32 sums overflow, or a block's range is subnormal)."""
    g = torch.Generator().manual_seed(20)
    w = torch.randn(4, 512, generator=g) * torch.tensor([1e-39, 1e-42, 1e13, 1e-30])[:, None]
    for im in (None, imatrix(512, seed=21)):
        if name == "iq4_nl" and im is None:  # non-finite block scales at 1e13: both paths refuse
            for fn in (lambda: get_format(name).quantize(w, None), lambda: reference(name, w, None, monkeypatch)):
                with pytest.raises(InputError):
                    fn()
            continue
        ours = get_format(name).quantize(w, im)
        ref = reference(name, w, im, monkeypatch)
        assert torch.equal(ours, ref), f"{name}: {bad_blocks(ours.numpy(), ref.numpy(), get_format(name).type_size)}"


@pytest.mark.parametrize("name", TYPES)
def test_float_overflow_is_safe(name):
    """Weights near the float32 limit overflow the searches' sums to inf/NaN: bytes or InputError, never a crash."""
    g = torch.Generator().manual_seed(22)
    w = torch.randn(2, 512, generator=g) * torch.tensor([3e38, 1e30])[:, None]
    fmt = get_format(name)
    for im in (None, imatrix(512, seed=23)):
        try:
            out = fmt.quantize(w, im)
        except InputError:
            assert name == "iq4_nl"
            continue
        assert tuple(out.shape) == fmt.byte_shape((2, 512))


def test_iq4_nl_rejects_an_imatrix_zero_over_a_block():
    im = imatrix(256, seed=12)
    im[64:96] = 0.0
    with pytest.raises(InputError):
        get_format("iq4_nl").quantize(weights(12, 256, seed=13), im)


@pytest.mark.parametrize("name", ["q4_k", "q5_0", "iq4_xs"])
def test_half_precision_inputs(name):
    w = weights(12, 512, seed=14)
    for dt in (torch.float16, torch.bfloat16):
        wd = w.to(dt)
        assert torch.equal(get_format(name).quantize(wd), get_format(name).quantize(wd.to(torch.float32)))


def test_c_library_is_built_and_loaded():
    """The extension was compiled into this install and opens with ctypes (CI fails here if the optional build
    was skipped, instead of silently testing the reference against itself)."""
    assert _cpu_fast.load_error() is None
    lib = _cpu_fast.library()
    assert lib is not None and lib.qf_abi_version() == _cpu_fast.ABI_VERSION
    assert _cpu_fast.enabled(torch.zeros(2, 256))


def test_shapes_the_c_loops_cannot_take_are_refused():
    """The C loops index without bounds checks, so the wrapper refuses what would read or write past the buffers."""
    with pytest.raises(UnsupportedFormat):
        _cpu_fast.quantize("iq4_xs", torch.zeros(4, 576))
    with pytest.raises(UnsupportedFormat):
        _cpu_fast.quantize("q4_k", torch.zeros(4, 512), torch.ones(256))
    with pytest.raises(UnsupportedFormat):
        _cpu_fast.quantize("q4_0", torch.zeros(512))


def test_switch_selects_reference(monkeypatch):
    w = torch.zeros(2, 256)
    assert _cpu_fast.enabled(w)
    monkeypatch.setenv(_cpu_fast.ENV, "torch")
    assert not _cpu_fast.enabled(w)
    monkeypatch.setenv(_cpu_fast.ENV, "c")
    assert _cpu_fast.enabled(w)
    assert not _cpu_fast.enabled(w.to("meta"))


def test_env_torch_routes_codecs_to_the_reference(monkeypatch):
    """With ``QUANTFORGE_CPU_KERNELS=torch`` the codecs never call the C kernels (and still give the same bytes)."""
    w = weights(12, 512, seed=15)
    fast = {name: get_format(name).quantize(w) for name in TYPES}
    monkeypatch.setenv(_cpu_fast.ENV, "torch")

    def refuse(*args, **kwargs):
        raise AssertionError("the C kernels ran although QUANTFORGE_CPU_KERNELS=torch")

    monkeypatch.setattr(_cpu_fast, "quantize", refuse)
    for name in TYPES:
        assert torch.equal(get_format(name).quantize(w), fast[name]), name


def test_fixed_cost_is_milliseconds():
    """Import, library load and a first call in a fresh process take milliseconds (no JIT compile): under a 20 ms
    budget of CPU time (measured 7-10 ms on a 2-core machine; CPU time, so a loaded runner does not count against
    it), and under 0.2 s of wall time."""
    code = ("import time, torch\nw = torch.randn(4, 256)\nt, c = time.perf_counter(), time.process_time()\n"
            "from quantforge.kernels import _cpu_fast\nassert _cpu_fast.enabled(w)\n_cpu_fast.quantize('q4_k', w)\n"
            "print(time.perf_counter() - t, time.process_time() - c)")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    wall, cpu = map(float, out.stdout.split())
    assert cpu < 0.02 and wall < 0.2, (cpu, wall)


def test_fp16_helpers_round_to_nearest_even():
    """The bit-level fp32 -> fp16 conversion equals numpy's (round to nearest even, subnormals, overflow, zeros)."""
    g = np.random.default_rng(0)
    bits = g.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    halfway = (np.arange(-70000, 70000, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0**-24)
    special = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e-8, 2.0**-25, -(2.0**-25),
                        3 * 2.0**-26, 2.0**-14, 2.0**-14 - 2.0**-25, 6.1e-5, 1.0009765625, 1.00048828125], np.float32)
    for arr in (x, halfway, special, x * np.float32(2.0**-100), x * np.float32(2.0**-120)):
        arr = np.ascontiguousarray(arr, np.float32)
        got = _cpu_fast.f16_bits(torch.from_numpy(arr)).numpy().view(np.uint16)
        with np.errstate(over="ignore"):
            want = arr.astype(np.float16).view(np.uint16)
        bad = np.nonzero(got != want)[0]
        assert bad.size == 0, f"{arr[bad[:5]]}: {got[bad[:5]]} != {want[bad[:5]]}"
        back = _cpu_fast.f16_values(torch.from_numpy(want.view(np.int16).copy())).numpy()
        assert np.array_equal(back.view(np.uint32), want.view(np.float16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_widen_to_float32_is_exact_and_counts_non_finite(dtype):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)  # every 16-bit pattern
    x = bits.view(dtype) if dtype != torch.float32 else torch.randn(70_000).mul_(1e3)
    if dtype == torch.float32:
        x[[3, 77, 5000]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    out, bad = _cpu_fast.to_float32(x)
    ref = x.to(torch.float32)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out.view(torch.int32)[~ref.isnan()], ref.view(torch.int32)[~ref.isnan()])
    assert torch.equal(out.isnan(), ref.isnan())
    assert bad == int((~torch.isfinite(ref)).sum()) > 0
