"""The registry's Triton tile dequantizers against the codecs' PyTorch ``dequantize``, bit for bit.

Every format with a tile is read through windows that start inside a quantization block and run past the last
row and column (masked), and through the one standalone dequantize launcher. Runs under ``TRITON_INTERPRET=1``
on CPU (tests/conftest.py sets it) or natively on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from quantforge.kernels import tiles
from quantforge.kernels._triton import HAVE_TRITON, tl, triton, triton_available
from quantforge.kernels.qweight import QuantWeight

from quantforge.formats import FORMATS, Family, get_format

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton with CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TILED = sorted(n for n, f in FORMATS.items() if f.tile is not None)
#: (format, double_quant) pairs: every tiled registry format, plus the double-quantized NF4/FP4 layout.
CASES = [(n, False) for n in TILED] + [("nf4", True), ("fp4", True)]

if HAVE_TRITON:

    @triton.jit
    def _window_kernel(src, aux, dst, r0, c0, n_rows, n_cols, stride, TILE: tl.constexpr, BR: tl.constexpr,
                       BC: tl.constexpr):
        i = tl.arange(0, BR)[:, None]
        j = tl.arange(0, BC)[None, :]
        row = r0 + i.to(tl.int64)
        col = c0 + j.to(tl.int64)
        y = TILE(src, aux, row, col, stride, (row < n_rows) & (col < n_cols))
        tl.store(dst + i * BC + j, y)


def _weight(name: str, double_quant: bool, rows: int = 5) -> QuantWeight:
    fmt = get_format(name)
    n = 2 * max(fmt.block_size, 64)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(rows, n, generator=g) * torch.exp(torch.randn(rows, n, generator=g))
    w[1, : fmt.block_size] = 0.0
    imatrix = torch.rand(n, generator=g) + 0.1 if fmt.takes_imatrix else None
    return QuantWeight.quantize(w, name, imatrix, double_quant=double_quant).to(DEVICE)


def _window(q: QuantWeight, r0: int, c0: int, br: int, bc: int) -> torch.Tensor:
    out = torch.full((br, bc), float("nan"), dtype=torch.float32, device=DEVICE)
    aux = q.extra.get("aux", q.data)
    _window_kernel[(1,)](q.data, aux, out, r0, c0, q.shape[0], q.shape[1], q.data.stride(0),
                         TILE=tiles.load_tile(q.format, q.double_quant), BR=br, BC=bc, enable_fp_fusion=False)
    return out


def _expected(q: QuantWeight, r0: int, c0: int, br: int, bc: int) -> torch.Tensor:
    ref = q.dequantize(torch.float32)
    out = torch.zeros((br, bc), dtype=torch.float32, device=DEVICE)
    part = ref[r0:r0 + br, c0:c0 + bc]
    out[: part.shape[0], : part.shape[1]] = part
    return out


@pytest.mark.parametrize("name, double_quant", CASES, ids=lambda c: str(c))
def test_tile_windows_equal_codec_dequantize(name: str, double_quant: bool) -> None:
    """Windows straddling block edges (start mid-block) and row edges (past the last row and column)."""
    q = _weight(name, double_quant)
    bs = q.format.block_size
    for r0, c0, br, bc in ((0, 0, 8, 64), (3, bs // 2 + 3, 4, 128), (4, q.shape[1] - 40, 2, 64)):
        got = _window(q, r0, c0, br, bc)
        want = _expected(q, r0, c0, br, bc)
        bad = (got != want).nonzero()
        assert bad.numel() == 0, f"{name} window {(r0, c0)}: first mismatch at {bad[0].tolist()}"


@pytest.mark.parametrize("name, double_quant", CASES, ids=lambda c: str(c))
def test_dequantize_launcher_equals_codec(name: str, double_quant: bool) -> None:
    q = _weight(name, double_quant, rows=17)
    got = tiles.dequantize(q.format, q.data, torch.float32, aux=q.extra.get("aux"), double_quant=q.double_quant)
    assert torch.equal(got, q.dequantize(torch.float32))


def test_registry_names_a_tile_for_every_format_with_a_kernel_layout() -> None:
    """Every float, bitsandbytes and block format the tiles cover is named in the registry."""
    covered = {"f32", "f16", "bf16", "nf4", "fp4", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k",
               "q5_k", "q6_k", "iq4_nl", "iq4_xs"}
    assert covered <= set(TILED)
    for name in TILED:
        fmt = get_format(name)
        assert callable(tiles.load_tile(fmt)), name
        assert fmt.family is not Family.FLOAT or fmt.tile.endswith("float_tile")


def test_quant_weight_round_trips_and_counts_bytes() -> None:
    w = torch.randn(4, 128)
    for name, dq in (("nf4", True), ("nf4", False), ("q4_k", False), ("bf16", False)):
        q = QuantWeight.quantize(w if name != "q4_k" else torch.randn(4, 256), name, double_quant=dq)
        assert q.double_quant == dq
        assert q.dequantize(torch.float32).shape == q.shape
        assert q.nbytes == q.data.numel() * q.data.element_size() + sum(
            v.numel() * v.element_size() for v in q.extra.values())
    from quantforge.kernels import nf4

    q = QuantWeight.quantize(w, "nf4", double_quant=True)
    packed, state = nf4.quantize_4bit(w, "nf4", double_quant=True)
    assert torch.equal(q.dequantize(torch.float32), nf4.dequantize_4bit(packed, state, torch.float32))
