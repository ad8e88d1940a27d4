"""Importance matrix: our layer-wise collection equals an independent hook-based computation on SmolLM2, and the
GGUF imatrix layout round-trips (and is accepted by llama-quantize when the binary is built)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from quantforge.calibration.imatrix import Imatrix, ImatrixAccumulator, ImatrixEntry, load_imatrix, save_imatrix_gguf

ROOT = Path(__file__).resolve().parents[2]


def llama_tool(name: str) -> Path | None:
    """A llama.cpp tool from $LLAMA_CPP_BIN, the lead's build under .bench, or PATH."""
    for folder in (os.environ.get("LLAMA_CPP_BIN"), ROOT / ".bench" / "llama-build" / "bin"):
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    found = shutil.which(name)
    return Path(found) if found else None


@pytest.fixture(scope="module")
def smollm2_imatrix(smollm2_dir, data_dir):
    """Our imatrix of SmolLM2 over 3 chunks of 96 tokens, from the layer-wise pass."""
    import torch
    from transformers import AutoTokenizer

    from quantforge.calibration.data import load_chunks
    from quantforge.calibration.profile import collect_imatrix, tensor_refs
    from quantforge.calibration.runner import DecoderRunner, load_model
    from quantforge.exporters.gguf.arch import arch_for

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    chunks = load_chunks([data_dir / "wikitext-2" / "wiki.valid.raw"], tok, 288, 96, 0)
    model = load_model(smollm2_dir, torch.float32)
    runner = DecoderRunner(model)
    refs = tensor_refs(runner, arch_for("llama"), ["q4_k"])
    imat = collect_imatrix(runner, refs, chunks.calibration, 96, ["wiki.valid.raw"], batch_size=2)
    return model, chunks.calibration, imat


def test_imatrix_matches_forward_hooks(smollm2_imatrix):
    import torch

    model, chunks, imat = smollm2_imatrix
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            def hook(m, args, out, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.tensor(chunks))
    for h in handles:
        h.remove()
    hf_to_gguf = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}
    assert len(imat.entries) == len(sums) == 30 * 7
    for name, s in sums.items():
        layer, sub = name.split(".")[2], ".".join(name.split(".")[3:])
        e = imat.entries[f"blk.{layer}.{hf_to_gguf[sub]}.weight"]
        assert e.counts.tolist() == [counts[name]] == [288]
        np.testing.assert_allclose(e.in_sum2[0], s.numpy(), rtol=2e-4, atol=1e-6)


def test_gguf_layout_round_trip(tmp_path, smollm2_imatrix):
    import gguf

    _, _, imat = smollm2_imatrix
    p = tmp_path / "imatrix.gguf"
    save_imatrix_gguf(imat, p)
    back = load_imatrix(p)
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["wiki.valid.raw"], 3, 96)
    assert sorted(back.entries) == sorted(imat.entries)
    for name, e in imat.entries.items():
        np.testing.assert_array_equal(back.entries[name].in_sum2, e.in_sum2)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    r = gguf.GGUFReader(str(p))
    assert r.fields["general.type"].contents() == "imatrix"
    t = {x.name: x for x in r.tensors}
    assert list(t["blk.0.ffn_down.weight.in_sum2"].shape) == [1536, 1]
    assert list(t["blk.0.ffn_down.weight.counts"].shape) == [1, 1]


def test_accumulator_skips_short_inputs_and_stacks():
    import torch

    acc = ImatrixAccumulator({"a": "blk.0.attn_q.weight"})
    acc.add("a", torch.ones(2, 8, 4))
    acc.add("a", torch.ones(1, 4))
    im = acc.result(["x"], 1, 8)
    e = im.entries["blk.0.attn_q.weight"]
    assert e.in_sum2.tolist() == [[16.0] * 4] and e.counts.tolist() == [16.0]
    assert im.for_tensor("blk.0.attn_q.weight").tolist() == [1.0] * 4


def test_llama_quantize_accepts_ours(tmp_path, smollm2_dir):
    tool = llama_tool("llama-quantize")
    if tool is None:
        pytest.skip("llama-quantize is not built (.bench/llama-build/bin or $LLAMA_CPP_BIN)")
    import gguf

    from quantforge.exporters.gguf import export_gguf
    from quantforge.testing import tiny_checkpoint

    ckpt = tiny_checkpoint("llama", tmp_path / "tiny", smollm2_dir)
    f16 = export_gguf(ckpt, tmp_path / "tiny-f16.gguf", qtype="f16")
    rng = np.random.default_rng(0)
    entries = {}
    for i in range(2):
        for kind, n in (("attn_q", 128), ("attn_k", 128), ("attn_v", 128), ("attn_output", 128),
                        ("ffn_gate", 128), ("ffn_up", 128), ("ffn_down", 256)):
            entries[f"blk.{i}.{kind}.weight"] = ImatrixEntry(rng.random((1, n), dtype=np.float32) * 512,
                                                             np.array([512.0], dtype=np.float32))
    save_imatrix_gguf(Imatrix(entries, ["unit-test"], 4, 128), tmp_path / "ours.gguf")
    out = tmp_path / "tiny-q4_k_m.gguf"
    run = subprocess.run([str(tool), "--imatrix", str(tmp_path / "ours.gguf"), str(f16), str(out), "q4_k_m", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    r = gguf.GGUFReader(str(out))
    assert r.fields["quantize.imatrix.entries_count"].contents() == len(entries)


def test_same_statistics_as_llama_imatrix(tmp_path, smollm2_dir, smollm2_gguf_f16, data_dir):
    """llama-imatrix on the same text and chunking gives the same per-column mean squares as ours."""
    tool = llama_tool("llama-imatrix")
    if tool is None:
        pytest.skip("llama-imatrix is not built (.bench/llama-build/bin or $LLAMA_CPP_BIN)")
    import torch
    from transformers import AutoTokenizer

    from quantforge.calibration.data import load_chunks
    from quantforge.calibration.profile import collect_imatrix, tensor_refs
    from quantforge.calibration.runner import DecoderRunner, load_model
    from quantforge.exporters.gguf.arch import arch_for

    text = tmp_path / "calib.txt"
    text.write_text((data_dir / "wikitext-2" / "wiki.valid.raw").read_text(encoding="utf-8")[:6000])
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    chunks = load_chunks([text], tok, 256, 128, 0).calibration
    runner = DecoderRunner(load_model(smollm2_dir, torch.float32))
    ours = collect_imatrix(runner, tensor_refs(runner, arch_for("llama"), ["q4_k"]), chunks, 128, ["calib.txt"])
    out = tmp_path / "llama-imatrix.gguf"
    run = subprocess.run([str(tool), "-m", str(smollm2_gguf_f16), "-f", str(text), "-o", str(out), "-c", "128",
                          "--chunks", "2", "-t", "2", "--no-ppl"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = load_imatrix(out)
    assert sorted(theirs.entries) == sorted(ours.entries)
    for name, e in ours.entries.items():
        assert theirs.entries[name].counts.tolist() == e.counts.tolist() == [256.0]
        a, b = theirs.for_tensor(name), ours.for_tensor(name)
        assert np.abs(a - b).sum() / np.abs(b).sum() < 0.02, name
