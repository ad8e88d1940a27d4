"""The Triton Q4_K/Q5_K quantize kernel (the CUDA path, with and without an imatrix) gives the reference codec's
bytes.

Run on the CPU under ``TRITON_INTERPRET=1`` (tests/conftest.py): sub-blocks that are all zero, all equal and
negative (the search's flat case), all positive, heavy-tailed (scales spanning many binades), and a row count that
leaves the last program partly empty; with an imatrix also zero importances, importances spanning many binades
and a whole zero super-block (the 6-bit scale search's empty case), and the search's coordinate descent moving.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from quantforge.errors import UnsupportedFormat
from quantforge.kernels import _cpu_fast
from quantforge.kernels.k45 import BLOCK_S, Q4_K, Q5_K


def _weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    rows = BLOCK_S // 2 + 3  # 2 super-blocks a row: one full program and a partial one
    w = torch.randn(rows, 512, generator=g) * 0.02
    w[0, :32] = 0.0
    w[1, 32:64] = -0.5
    w[2, 64:96] = torch.rand(32, generator=g) + 0.1
    w[3] = torch.randn(512, generator=g) * torch.exp(3 * torch.randn(512, generator=g))
    w[4, :256] = torch.randn(256, generator=g) * 1e-3
    w[4, 7] = 40.0
    return w


def _imatrix() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    im = torch.rand(512, generator=g) * torch.exp(2 * torch.randn(512, generator=g))
    im[:20] = 0.0
    return im


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("codec", [Q4_K, Q5_K], ids=lambda c: c.name)
def test_triton_quantize_equals_reference(codec, with_imatrix, monkeypatch):
    w = _weights()
    imatrix = None
    if with_imatrix:
        imatrix = _imatrix()
        w[5, 256:] = 0.0
    monkeypatch.setenv(_cpu_fast.ENV, "torch")  # the PyTorch reference, not the C kernels
    ref = codec.quantize(w, imatrix)
    got = codec.quantize_triton(w, imatrix)
    bad = (got != ref).any(dim=1).nonzero().flatten().tolist()
    assert torch.equal(got, ref), f"{codec.name}: rows {bad} differ"
    if with_imatrix:  # the same bytes as the C kernels (llama.cpp's own code path), and the imatrix mattered
        monkeypatch.setenv(_cpu_fast.ENV, "c")
        assert torch.equal(codec.quantize(w, imatrix), ref)
        assert not torch.equal(codec.quantize(w, None), ref)


def test_triton_quantize_rejects_a_wrong_imatrix_shape():
    with pytest.raises(UnsupportedFormat, match="one value per column"):
        Q4_K.quantize_triton(torch.zeros(2, 256), torch.ones(512))


_REDUCTIONS = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from quantforge.kernels import k45

sig = {"x_ptr": "*fp32", "qw_ptr": "*fp32", "out_ptr": "*u8", "cand_ptr": "*fp32", "qp_ptr": "*fp32", "S": "i32",
       "SB_ROW": "i32"}
for qw in (0, 1):
    c = {"NMAX": 15, "NSTEP": 15, "FIVE": 0, "HAS_QW": qw, "TYPE_SIZE": 144, "BLOCK_S": k45.BLOCK_S}
    src = ASTSource(fn=k45._q45_kernel, signature={**sig, **{k: "constexpr" for k in c}}, constexprs=c)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
    print(kernel.asm["ttir"].count('"tt.reduce"'))
"""


def test_imatrix_search_is_compiled_as_loops(tmp_path):
    """The imatrix path's super-block scale searches (``make_qp_quants`` of the scales and of the mins) stay loops
    in the compiled kernel. Unrolled, they added 296 reductions to the kernel, and ptxas took 55-65 s on a first
    ``quantize --imatrix`` of each of Q4_K and Q5_K (benchmarks/compile_time.py); as loops they add 16 and it takes
    about a second. Compiled for sm_90 with Triton's own ptxas (no GPU needed), in a process without the
    interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-P", "-c", _REDUCTIONS], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    plain, with_imatrix = (int(v) for v in res.stdout.split())
    assert with_imatrix - plain <= 16, f"{with_imatrix - plain} reductions added by the imatrix path"
