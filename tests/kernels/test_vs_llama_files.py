"""Per type, our quantization error on SmolLM2 tensors is no worse than llama.cpp's: llama.cpp's
``llama_model_quantize`` writes a pure-type file from our f16 GGUF, we read its tensors back with ``gguf`` and
compare the squared error of its dequantized weights with ours for the same tensors and type."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from quantforge.formats import get_format

# type -> llama.cpp ftype whose "pure" mode gives that type to every tensor it fits
PURE = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q8_0": 7, "q2_k": 10, "q3_k": 11, "q4_k": 14, "q5_k": 16,
        "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30}
MAX_TENSORS = 6


@pytest.fixture(scope="module")
def f16_tensors(smollm2_gguf_f16):
    r = gguf.GGUFReader(str(smollm2_gguf_f16))
    return {t.name: np.array(t.data, dtype=np.float32) for t in r.tensors if t.tensor_type.name == "F16"}


def _pure_quantize(src, out, ftype):
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    params.pure = True
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0


@pytest.mark.parametrize("name", list(PURE))
def test_error_no_worse_than_llama_cpp(name, smollm2_gguf_f16, f16_tensors, tmp_path):
    fmt = get_format(name)
    out = tmp_path / f"pure-{name}.gguf"
    _pure_quantize(smollm2_gguf_f16, out, PURE[name])
    theirs = [t for t in gguf.GGUFReader(str(out)).tensors if t.tensor_type.name.lower() == name]
    assert theirs, f"llama.cpp wrote no {name} tensor"
    ratios = []
    for t in theirs[:MAX_TENSORS]:
        w = torch.from_numpy(f16_tensors[t.name])
        deq_theirs = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type)).reshape(w.shape)
        deq_ours = fmt.dequantize(fmt.quantize(w)).reshape(w.shape)
        e_ours = float(((deq_ours.double() - w.double()) ** 2).sum())
        e_theirs = float(((deq_theirs.double() - w.double()) ** 2).sum())
        ratios.append(e_ours / e_theirs if e_theirs > 0 else (1.0 if e_ours == 0 else float("inf")))
    assert sum(ratios) / len(ratios) <= 1.01, ratios
