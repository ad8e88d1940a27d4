"""The low-bit mixes (iq1_s ... iq3_m, q2_k_s, tq1_0, tq2_0) against llama.cpp's own ``llama-quantize``.

``tests/data/llama_quantize_smollm2_types.json`` holds the type llama-quantize gives every SmolLM2 tensor in each
mix, with and without an imatrix, and whether it refuses the mix without one (written by
``benchmarks/llama_mix_types.py``). Our rules must give the same composition. Where the built
``llama-quantize`` is present (``.bench/llama-build``), the table is checked against a fresh dry run, and a real
Q2_K_S file is compared tensor by tensor, bytes included. Files of the new mixes load and run in llama.cpp; the
ternary mixes, which need no imatrix, are compared byte for byte with llama.cpp's quantizer through
llama-cpp-python.
"""

from __future__ import annotations

import pytest
import torch
from helpers import llama_mixes as lm
from helpers.reference import llama_cpp_logits, quantize_with_llama_cpp

from quantforge.arch import arch_for
from quantforge.model_source import ModelSource
from quantforge.presets import get_mix, imatrix_required, mix_types
from quantforge.tensor_layout import model_shape, plan_tensors

TABLE = lm.load_table()
MIXES = list(TABLE["mixes"])
PROMPT = [1, 504, 3458, 282, 5168, 314]


@pytest.fixture(scope="module")
def smollm2_layout(smollm2_dir):
    src = ModelSource.open(smollm2_dir)
    try:
        jobs = plan_tensors(src, arch_for(src.model_type))
        return [(j.gguf_name, tuple(j.shape)) for j in jobs], model_shape(src, jobs)
    finally:
        src.close()


def test_table_covers_the_mixes():
    assert sorted(MIXES) == sorted(["iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs",
                                    "iq3_s", "iq3_m", "q2_k_s", "tq1_0", "tq2_0"])
    assert len(TABLE["tensors"]) == 272


@pytest.mark.parametrize("mix", MIXES)
def test_composition_matches_llama_quantize(mix, smollm2_layout):
    tensors, shape = smollm2_layout
    assert sorted(n for n, _ in tensors) == sorted(TABLE["tensors"])
    for case, has_imatrix in (("imatrix", True), ("no_imatrix", False)):
        ours = mix_types(mix, tensors, shape, has_imatrix=has_imatrix)
        theirs = lm.expand(TABLE["mixes"][mix][case], TABLE)
        diff = {n: (ours[n], theirs[n]) for n in theirs if ours[n] != theirs[n]}
        assert not diff, f"{mix} ({case}): {len(diff)} tensors differ (ours, llama.cpp), e.g. {list(diff.items())[:3]}"
    refused = bool(imatrix_required(mix_types(mix, tensors, shape, has_imatrix=False), mix))
    assert refused == TABLE["mixes"][mix]["no_imatrix_refused"]


def _needs_binary() -> None:
    if not lm.LLAMA_QUANTIZE.exists():
        pytest.skip(f"{lm.LLAMA_QUANTIZE} not built (benchmarks/build_llama_cpp.sh); the committed table stands in")


def test_table_is_what_llama_quantize_says(smollm2_dir, smollm2_gguf_f16, tmp_path):
    """A fresh dry run of the built llama-quantize gives the committed table."""
    _needs_binary()
    imatrix = lm.smollm2_imatrix(smollm2_dir, tmp_path / "imatrix.gguf")
    for mix in MIXES:
        with_im, _ = lm.dry_run_types(smollm2_gguf_f16, mix, imatrix)
        without, refused = lm.dry_run_types(smollm2_gguf_f16, mix, None)
        assert with_im == lm.expand(TABLE["mixes"][mix]["imatrix"], TABLE), mix
        assert without == lm.expand(TABLE["mixes"][mix]["no_imatrix"], TABLE), mix
        assert refused == TABLE["mixes"][mix]["no_imatrix_refused"], mix


def test_q2_k_s_file(smollm2_dir, smollm2_gguf_f16, tmp_path):
    """Our Q2_K_S file (with an imatrix; refused without one, like llama-quantize) has llama.cpp's composition
    and runs in llama.cpp; where llama-quantize is built, every tensor's bytes equal its file's."""
    from quantforge.exporters.gguf import export_gguf

    from quantforge.errors import ImatrixRequired

    with pytest.raises(ImatrixRequired, match="q2_k"):
        export_gguf(smollm2_dir, tmp_path / "refused.gguf", qtype="q2_k_s")
    imatrix = lm.smollm2_imatrix(smollm2_dir, tmp_path / "imatrix.gguf")
    ours = export_gguf(smollm2_dir, tmp_path / "ours.gguf", qtype="q2_k_s", imatrix=imatrix)
    assert lm.gguf_types(ours) == lm.expand(TABLE["mixes"]["q2_k_s"]["imatrix"], TABLE)
    assert bool(torch.isfinite(llama_cpp_logits(ours, PROMPT, n_ctx=64)).all())
    if lm.LLAMA_QUANTIZE.exists():
        theirs = lm.run_llama_quantize(smollm2_gguf_f16, tmp_path / "theirs.gguf", "q2_k_s", imatrix)
        a, b = lm.gguf_tensor_bytes(ours), lm.gguf_tensor_bytes(theirs)
        assert sorted(a) == sorted(b)
        bad = [n for n in a if a[n] != b[n]]
        assert not bad, f"{len(bad)} tensors differ from llama-quantize's, first {bad[0]}"


@pytest.mark.parametrize("mix", ["tq1_0", "tq2_0"])
def test_ternary_file_equals_llama_cpp(mix, smollm2_dir, smollm2_gguf_f16, tmp_path):
    """No imatrix needed: llama.cpp's own quantizer (llama-cpp-python) gives the same tensors, byte for byte."""
    from quantforge.exporters.gguf import export_gguf

    ours = export_gguf(smollm2_dir, tmp_path / "ours.gguf", qtype=mix)
    theirs = tmp_path / "theirs.gguf"
    quantize_with_llama_cpp(smollm2_gguf_f16, theirs, ftype=get_mix(mix).file_type)
    a, b = lm.gguf_tensor_bytes(ours), lm.gguf_tensor_bytes(theirs)
    assert lm.gguf_types(ours) == lm.gguf_types(theirs) == lm.expand(TABLE["mixes"][mix]["no_imatrix"], TABLE)
    bad = [n for n in a if a[n] != b[n]]
    assert not bad, f"{len(bad)} tensors differ from llama.cpp's, first {bad[0]}"
    assert bool(torch.isfinite(llama_cpp_logits(ours, PROMPT, n_ctx=64)).all())
