"""A merge written by the GGUF export pipeline (base rows read by its readers, merged row chunk by row chunk on the
encoding device) gives the file the tensor-by-tensor merged source gives: every type of a mix, a plan, a merge
onto an NF4 base and onto a GGUF base."""

from __future__ import annotations

import json

import pytest
import torch
from quantforge.exporters.gguf.writer import export_gguf, write_gguf
from quantforge.kernels import merge as merge_mod
from helpers.reference import tiny_llama

from quantforge.cli.main import main
from quantforge.merged_source import MergedSource

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
CHUNK = 256 * 24
"""Weights per row chunk: 24 rows of 256, so every target spans several chunks, the last one short."""


class TensorByTensor(MergedSource):
    """The merged source seen only through ``get``: every LoRA target merged whole, then cut into row chunks."""

    read_rows = None
    finish_rows = None


def _base(out):
    """A 2-layer random Llama in bf16 whose widths fit the 256-wide k-quant blocks."""
    tiny_llama(out, hidden=256, intermediate=512, attention_bias=False)
    vocab = {f"t{i}": i for i in range(256)}  # a byte-level BPE vocabulary without merges fills the GGUF metadata
    (out / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []},
                                                    "pre_tokenizer": {"type": "ByteLevel"}, "added_tokens": []}))
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The base checkpoint and a PEFT adapter for it (rsLoRA, per-module ranks, a modules_to_save norm)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = _base(tmp_path_factory.mktemp("base") / "model")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=True,
                                           rank_pattern={"down_proj": 4}, modules_to_save=["model.norm"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(adapter)
    return base, adapter


def _write(cls, checkpoint, adapter, out, qtype="q4_k_m", plan=None, **merge):
    src = cls.open_merged(checkpoint, adapter, **merge)
    try:
        write_gguf(src, out, qtype=qtype, plan=plan, chunk_elems=CHUNK)
    finally:
        src.close()
    return out.read_bytes()


@pytest.fixture
def rank1_merge(monkeypatch):
    """Both sides merge with the reference merge, which the Triton kernel of a GPU equals bit for bit: its value
    for each weight does not depend on the rows merged together, unlike a BLAS product's. Records the shapes of
    the bases it merges."""
    calls = []

    def merge(base, a, b, scale, dtype=torch.float32):
        calls.append(base.shape)
        return merge_mod.merge_reference(base, a, b, scale, dtype)

    monkeypatch.setattr(merge_mod, "merge_blas", merge)
    return calls


@pytest.mark.parametrize("qtype", ["q4_k_m", "plan"])
def test_row_chunk_merge_equals_whole_tensor_merge(model, tmp_path, rank1_merge, qtype):
    """The 16-bit base merged row chunk by row chunk in the encoder (the GPU path) writes the bytes of the merge
    of each whole tensor, for the q4_k_m mix and a plan of k-quant and legacy types."""
    base, adapter = model
    plan = None
    if qtype == "plan":
        plan = tmp_path / "plan.yaml"
        plan.write_text("version: 1\ntarget: gguf\nbase_type: q4_k_m\ntensors:\n"
                        "  blk.0.attn_q.weight: q5_k\n  blk.0.attn_k.weight: q6_k\n  blk.0.ffn_up.weight: q2_k\n"
                        "  blk.1.ffn_down.weight: q5_0\n  blk.1.attn_output.weight: q3_k\n  output.weight: q8_0\n")
    qtype = "q4_k_m" if plan else qtype
    want = _write(TensorByTensor, base, adapter, tmp_path / "want.gguf", qtype, plan)
    rank1_merge.clear()
    got = _write(MergedSource, base, adapter, tmp_path / "got.gguf", qtype, plan, row_merge=True)
    assert got == want
    # row chunks of 24 rows of 256 (gate/up: the last one 8 rows) and of 12 rows of 512 (down: the last one 4 rows)
    assert {(24, 256), (8, 256), (12, 512), (4, 512)} <= set(rank1_merge)


@pytest.mark.parametrize("qtype", ["q4_k_m", "q8_0"])
def test_cli_merge_equals_whole_tensor_merge(model, tmp_path, qtype):
    """``quantforge merge --format gguf`` on the CPU writes the tensor-by-tensor merge's bytes (BLAS merge)."""
    base, adapter = model
    src = TensorByTensor.open_merged(base, adapter)
    write_gguf(src, tmp_path / "want.gguf", qtype=qtype)
    src.close()
    out = tmp_path / "got.gguf"
    assert main(["merge", str(base), str(adapter), "--format", "gguf", "--type", qtype, "-o", str(out),
                 "--quiet"]) == 0
    assert out.read_bytes() == (tmp_path / "want.gguf").read_bytes()


@pytest.mark.parametrize("which", ["nf4", "gguf"])
def test_quantized_base_merge_equals_whole_tensor_merge(model, tmp_path, which):
    """``--base quantized`` (NF4 with double quantization) and ``--base-gguf`` (a q8_0 file of the base): the
    pipeline writes the tensor-by-tensor merge's bytes, even when asked to merge in row chunks (these bases are
    merged whole)."""
    base, adapter = model
    merge = {"base": "quantized", "base_format": "nf4"}
    if which == "gguf":
        merge = {"base_gguf": export_gguf(base, tmp_path / "base-q8_0.gguf", qtype="q8_0")}
    want = _write(TensorByTensor, base, adapter, tmp_path / "want.gguf", **merge)
    got = _write(MergedSource, base, adapter, tmp_path / "got.gguf", row_merge=True, **merge)
    assert got == want
    plain = _write(MergedSource, base, adapter, tmp_path / "plain.gguf")
    assert plain != want


def test_nan_in_a_merged_base_is_refused(model, tmp_path, rank1_merge):
    """A NaN in the 16-bit base of a LoRA target, merged row chunk by row chunk, is caught after the merge: the
    tensor is named and no file is written."""
    import shutil

    from safetensors.torch import load_file, save_file

    from quantforge.errors import CorruptCheckpoint

    base, adapter = model
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][300, 7] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpoint, match=r"layers\.1\.mlp\.up_proj.* 1 NaN"):
        _write(MergedSource, bad, adapter, tmp_path / "out.gguf", row_merge=True)
    assert not (tmp_path / "out.gguf").exists() and (24, 256) in rank1_merge  # it went through the row merge
