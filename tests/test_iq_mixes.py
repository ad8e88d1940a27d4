"""The i-quant mixes (iq1_s, iq1_m, iq2_xxs, iq2_xs, iq2_s, iq2_m, iq3_xxs; iq3_xs, iq3_s, iq3_m): per-tensor types
on SmolLM2 and on larger models, and files that llama.cpp loads and runs.

The expected composition is llama-quantize's rule set for these mixes written out for SmolLM2 (30 layers, 9
query / 3 KV heads, tied embeddings, 576-wide rows that fit no 256-weight block): output (the tied token_embd)
Q8_0; attn_v Q2_K -> Q4_0 (row fallback; IQ3_S / IQ3_XXS -> IQ4_NL in IQ2_S, IQ2_M, IQ3_XXS); ffn_down Q2_K
(IQ3_S in IQ2_S/M) in the first 3 layers and the base type in the others (1536-wide rows fit; IQ3_XXS keeps its
type everywhere with an imatrix); attn_output IQ2_XXS / IQ3_S or the base type, then IQ4_NL (row fallback);
every other 576-wide weight IQ4_NL. The IQ3_S mixes: output Q8_0, ffn_down IQ3_S (IQ3_M: Q4_K in the first 3 layers),
IQ3_M's attn_v and attn_output Q4_K -> Q5_0, every other weight IQ4_NL.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from helpers.reference import llama_cpp_logits

from quantforge.imatrix import Imatrix, ImatrixEntry, save_imatrix_gguf
from quantforge.presets import ModelShape, imatrix_required, mix_types

MIXES = ["iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs"]
IQ3_MIXES = ["iq3_xs", "iq3_s", "iq3_m"]
#: ffn_down types (first 3 layers, the rest) where they differ from (Q2_K, the mix's own type).
FFN_DOWN = {"iq2_s": ("iq3_s", "iq2_xs"), "iq2_m": ("iq3_s", "iq2_s"), "iq3_xxs": ("iq3_xxs", "iq3_xxs")}
SMOLLM2 = ModelShape(n_layer=30, n_head=9, n_head_kv=3, tied_embeddings=True)


def smollm2_tensors() -> list[tuple[str, tuple[int, ...]]]:
    out = [("token_embd.weight", (49152, 576)), ("output_norm.weight", (576,))]
    for i in range(30):
        out += [(f"blk.{i}.{t}.weight", (576, 576)) for t in ("attn_q", "attn_output")]
        out += [(f"blk.{i}.{t}.weight", (192, 576)) for t in ("attn_k", "attn_v")]
        out += [(f"blk.{i}.{t}.weight", (1536, 576)) for t in ("ffn_gate", "ffn_up")]
        out += [(f"blk.{i}.ffn_down.weight", (576, 1536))]
        out += [(f"blk.{i}.{t}.weight", (576,)) for t in ("attn_norm", "ffn_norm")]
    return out


def expected(mix: str, name: str) -> str:
    if name.endswith("_norm.weight"):
        return "f32"
    if name == "token_embd.weight":
        return "q8_0"
    if mix in IQ3_MIXES:
        first = int(name.split(".")[1]) < 3 if name.startswith("blk.") else False
        if "ffn_down" in name:
            return "q4_k" if mix == "iq3_m" and first else "iq3_s"
        return "q5_0" if mix == "iq3_m" and ("attn_v" in name or "attn_output" in name) else "iq4_nl"
    if "attn_v" in name:
        return "iq4_nl" if mix in FFN_DOWN else "q4_0"
    if "ffn_down" in name:
        first, rest = FFN_DOWN.get(mix, ("q2_k", mix))
        return first if int(name.split(".")[1]) < 3 else rest
    return "iq4_nl"


@pytest.mark.parametrize("mix", MIXES + IQ3_MIXES)
def test_smollm2_composition(mix):
    types = mix_types(mix, smollm2_tensors(), SMOLLM2, has_imatrix=True)
    assert types == {n: expected(mix, n) for n, _ in smollm2_tensors()}
    needs = {n for n, t in types.items() if "ffn_down" in n and t != "iq3_s" and t != "q2_k"}
    needs = [] if mix in IQ3_MIXES else sorted(needs)
    assert sorted(imatrix_required(types)) == sorted(needs)


def test_iq2_s_m_and_iq3_xxs_rules():
    """A 4096-wide model: IQ2_S/IQ2_M promote to IQ3_S; IQ3_XXS without GQA and without an imatrix."""
    model = ModelShape(n_layer=32, n_head=32, n_head_kv=8, tied_embeddings=False)
    mha = ModelShape(n_layer=32, n_head=32, n_head_kv=32, tied_embeddings=False)
    tensors = [("token_embd.weight", (128256, 4096)), ("output.weight", (128256, 4096)),
               ("blk.0.attn_v.weight", (4096, 4096)), ("blk.0.attn_k.weight", (4096, 4096)),
               ("blk.9.attn_q.weight", (4096, 4096)), ("blk.9.attn_output.weight", (4096, 4096)),
               ("blk.1.ffn_down.weight", (4096, 14336)), ("blk.9.ffn_down.weight", (4096, 14336)),
               ("blk.9.ffn_up.weight", (14336, 4096))]
    assert list(mix_types("iq2_m", tensors, mha, True).values()) == [
        "iq3_s", "q5_k", "iq3_s", "iq2_s", "iq2_s", "iq3_s", "iq3_s", "iq2_s", "iq2_s"]
    assert mix_types("iq2_s", tensors, model, True)["blk.0.attn_v.weight"] == "q4_k"
    assert list(mix_types("iq3_xxs", tensors, mha, False).values()) == [
        "iq3_s", "q5_k", "iq3_s", "iq2_s", "iq2_s", "iq3_s", "q4_k", "q3_k", "iq3_xxs"]
    assert mix_types("iq3_xxs", tensors, mha, True)["blk.0.attn_v.weight"] == "iq3_xxs"


def test_iq3_rules_on_a_gqa_model():
    """A 4096-wide GQA-8 model, 32 layers: the IQ3_XS / IQ3_M specifics."""
    model = ModelShape(n_layer=32, n_head=32, n_head_kv=8, tied_embeddings=False)
    tensors = [("token_embd.weight", (128256, 4096)), ("output.weight", (128256, 4096)),
               ("blk.0.attn_v.weight", (1024, 4096)), ("blk.0.attn_k.weight", (1024, 4096)),
               ("blk.9.attn_q.weight", (4096, 4096)), ("blk.9.attn_output.weight", (4096, 4096)),
               ("blk.1.ffn_down.weight", (4096, 14336)), ("blk.9.ffn_down.weight", (4096, 14336)),
               ("blk.1.ffn_up.weight", (14336, 4096)), ("blk.9.ffn_gate.weight", (14336, 4096))]
    xs = mix_types("iq3_xs", tensors, model, has_imatrix=True)
    assert xs == {"token_embd.weight": "iq3_s", "output.weight": "q6_k", "blk.0.attn_v.weight": "q4_k",
                  "blk.0.attn_k.weight": "iq3_xxs", "blk.9.attn_q.weight": "iq3_xxs",
                  "blk.9.attn_output.weight": "iq3_s", "blk.1.ffn_down.weight": "iq3_s",
                  "blk.9.ffn_down.weight": "iq3_s", "blk.1.ffn_up.weight": "iq3_s", "blk.9.ffn_gate.weight": "iq3_xxs"}
    m = mix_types("iq3_m", tensors, model, has_imatrix=False)
    names = ("blk.0.attn_v.weight", "blk.0.attn_k.weight", "blk.9.attn_output.weight", "blk.1.ffn_down.weight",
             "blk.9.ffn_down.weight")
    assert [m[n] for n in names] == ["q4_k", "iq3_s", "q4_k", "q4_k", "iq3_s"]


def test_rules_beyond_row_fallbacks():
    """A 4096-wide GQA-8 model: attn_v Q4_K, output Q5_K, untied token_embd Q2_K, IQ1 attn_output IQ2_XXS."""
    model = ModelShape(n_layer=32, n_head=32, n_head_kv=8, tied_embeddings=False)
    tensors = [("token_embd.weight", (128256, 4096)), ("output.weight", (128256, 4096)),
               ("blk.0.attn_v.weight", (1024, 4096)), ("blk.5.attn_output.weight", (4096, 4096)),
               ("blk.5.ffn_down.weight", (4096, 14336)), ("blk.3.ffn_down.weight", (4096, 14336)),
               ("blk.5.attn_q.weight", (4096, 4096))]
    got = mix_types("iq1_m", tensors, model, has_imatrix=True)
    assert got == {"token_embd.weight": "q2_k", "output.weight": "q5_k", "blk.0.attn_v.weight": "q4_k",
                   "blk.5.attn_output.weight": "iq2_xxs", "blk.5.ffn_down.weight": "iq1_m",
                   "blk.3.ffn_down.weight": "q2_k", "blk.5.attn_q.weight": "iq1_m"}
    assert mix_types("iq2_xs", tensors, model, True)["blk.5.attn_output.weight"] == "iq2_xs"


@pytest.mark.parametrize("mix", ["iq2_xxs", "iq1_m", "iq3_m"])
def test_smollm2_file_loads_and_runs_in_llama_cpp(mix, smollm2_dir, tmp_path):
    from quantforge.exporters.gguf import export_gguf

    rng = np.random.default_rng(0)
    entries = {}
    for name, shape in smollm2_tensors():
        if len(shape) == 2 and name != "token_embd.weight":
            entries[name] = ImatrixEntry(rng.lognormal(0.0, 1.0, (1, shape[1])).astype(np.float32) * 64,
                                         np.array([64.0], np.float32))
    save_imatrix_gguf(Imatrix(entries, ["random"], 1, 512), tmp_path / "imatrix.gguf")
    out = export_gguf(smollm2_dir, tmp_path / f"{mix}.gguf", qtype=mix, imatrix=tmp_path / "imatrix.gguf")
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    assert types == {n: expected(mix, n) for n, _ in smollm2_tensors()}
    logits = llama_cpp_logits(out, [1, 504, 3458, 282, 5168, 314], n_ctx=64)
    assert logits.shape[0] == 6 and bool(torch.isfinite(logits).all())


def test_mix_without_imatrix_is_refused_like_llama_quantize(smollm2_dir, tmp_path):
    """IQ1_M tensors need an imatrix in llama-quantize (ggml itself would make them): refused before writing."""
    from quantforge.errors import ImatrixRequired
    from quantforge.exporters.gguf import export_gguf

    with pytest.raises(ImatrixRequired, match="blk.3.ffn_down.weight"):
        export_gguf(smollm2_dir, tmp_path / "x.gguf", qtype="iq1_m")
    assert not (tmp_path / "x.gguf").exists()

