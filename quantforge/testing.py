"""Helpers shared by the tests and benchmarks (shipped in the package so ``--import-mode=importlib`` finds them).

Nothing here runs at import time; heavy modules are imported inside the functions.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=1)
def _libggml() -> Any:
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(libdir / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    return lib


def ggml_quantize(weight: Any, ggml_type: int, imatrix: Any = None) -> Any:
    """Quantize a 2-D float32 numpy array with llama.cpp's own ``ggml_quantize_chunk`` (the code path
    ``llama-quantize`` runs), through the ``libggml-base`` that llama-cpp-python ships. Returns uint8 bytes
    ``(rows, nbytes_per_row)``."""
    import gguf
    import numpy as np

    w = np.ascontiguousarray(weight, dtype=np.float32)
    rows, n = w.shape
    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    out = np.zeros((rows, n // bs * ts), dtype=np.uint8)
    lib = _libggml()
    lib.ggml_quantize_init(ggml_type)
    imp = None
    if imatrix is not None:
        im = np.ascontiguousarray(imatrix, dtype=np.float32)
        imp = im.ctypes.data
    size = lib.ggml_quantize_chunk(ggml_type, w.ctypes.data, out.ctypes.data, 0, rows, n, imp)
    if size != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {size} bytes, expected {out.nbytes}")
    return out


def weighted_sq_error(weight: Any, deq: Any, imatrix: Any = None) -> float:
    """Sum over elements of ``imatrix[col] * (w - deq)^2`` (plain squared error without an imatrix)."""
    import torch

    w = torch.as_tensor(weight, dtype=torch.float64)
    e = (w - torch.as_tensor(deq, dtype=torch.float64)) ** 2
    if imatrix is not None:
        e = e * torch.as_tensor(imatrix, dtype=torch.float64)[None, :]
    return float(e.sum())


def interpreter_downcast(ref: Any, dtype: Any) -> Any:
    """``ref`` (float32) cast to ``dtype`` the way a Triton kernel's store does it on this machine.

    Triton's CPU interpreter truncates float32 -> bfloat16 (round toward zero) even when asked for
    round-to-nearest-even; on a GPU the cast is round-to-nearest-even like ``Tensor.to``.
    """
    import torch

    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" and ref.device.type == "cpu":
        bits = ref.to(torch.float32).contiguous().view(torch.int32) & ~0xFFFF
        return bits.view(torch.float32).to(torch.bfloat16)
    return ref.to(dtype)
