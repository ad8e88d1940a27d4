"""The pipelined GGUF writer (reads, encoding and writes overlapped) writes the same bytes as the serial one.

A small Llama-shaped checkpoint (4 safetensors shards, Llama-3 rope scaling so a computed ``rope_freqs`` tensor
is written, Q/K rows permuted, 1-D norms) is exported with small row chunks, so tensors span several chunks and
the read-ahead budget is exercised; the serial path (one encoder thread, no read-ahead) is the reference.
"""

from __future__ import annotations

import json
import shutil
import threading

import pytest

from quantforge.errors import CorruptCheckpoint
from quantforge.exporters.gguf import pipeline
from quantforge.exporters.gguf.writer import write_gguf
from quantforge.model_source import ModelSource

CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
       "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
       "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
       "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


def _shapes(cfg):
    h, f, kv = cfg["hidden_size"], cfg["intermediate_size"], 256 // 4 * 2
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    return shapes


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, smollm2_dir):
    """A random bf16 Llama in 4 shards with SmolLM2's tokenizer."""
    import torch
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("sharded")
    g = torch.Generator().manual_seed(0)
    shapes = _shapes(CFG)
    names = list(shapes)
    parts = [names[:1], names[1:10], names[10:19], names[19:]]
    weight_map = {}
    for k, part in enumerate(parts):
        fname = f"model-{k + 1:05d}-of-00004.safetensors"
        tensors = {}
        for n in part:
            s = shapes[n]
            t = 1.0 + 0.1 * torch.rand(s, generator=g) if len(s) == 1 else torch.randn(s, generator=g) * 0.02
            tensors[n] = t.to(torch.bfloat16)
            weight_map[n] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(CFG))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / f, out / f)
    return out


@pytest.fixture(scope="module")
def serial(sharded, tmp_path_factory):
    """Reference files from the serial path, one per mix."""
    out = tmp_path_factory.mktemp("serial")
    src = ModelSource.open(sharded)
    try:
        return {m: write_gguf(src, out / f"{m}.gguf", m, chunk_elems=8192, pipelined=False).read_bytes()
                for m in ("q4_k_m", "q8_0")}
    finally:
        src.close()


@pytest.mark.parametrize("mix", ["q4_k_m", "q8_0"])
def test_pipelined_file_equals_serial_file(sharded, serial, tmp_path, mix):
    src = ModelSource.open(sharded)
    try:
        out = write_gguf(src, tmp_path / "p.gguf", mix, chunk_elems=8192)
    finally:
        src.close()
    assert out.read_bytes() == serial[mix]


def test_pipelined_two_devices_and_tiny_read_ahead_equal_serial(sharded, serial, tmp_path, monkeypatch):
    """Two encoder threads sharing the chunks, and a read-ahead budget below one chunk (each read waits for the
    previous chunk to be consumed): same bytes; the stage timers saw every stage."""
    monkeypatch.setattr(pipeline, "READ_AHEAD_BYTES", 1)
    monkeypatch.setattr(pipeline, "READ_THREADS", 2)
    stats = pipeline.Stats()
    src = ModelSource.open(sharded)
    try:
        with pipeline.collect(stats):
            out = write_gguf(src, tmp_path / "p.gguf", "q8_0", chunk_elems=8192, devices=["cpu", "cpu"])
    finally:
        src.close()
    assert out.read_bytes() == serial["q8_0"]
    assert stats.chunks > 2 * len(_shapes(CFG))
    rope_freqs = 4 * 64 // 2  # the computed float32 tensor, head_dim / 2 values
    assert stats.nbytes["read checkpoint bytes (reader threads)"] == sum(
        p.stat().st_size for p in sharded.glob("*.safetensors")) - _header_bytes(sharded) + rope_freqs
    assert {"encode on cpu (encoder threads)", "writer waits for encoded chunks"} <= set(stats.seconds)


def _header_bytes(folder):
    import struct

    total = 0
    for p in folder.glob("*.safetensors"):
        with open(p, "rb") as f:
            total += 8 + struct.unpack("<Q", f.read(8))[0]
    return total


def test_nan_in_a_later_chunk_is_a_corrupt_checkpoint_naming_the_tensor(sharded, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(sharded, bad)
    shard = bad / "model-00003-of-00004.safetensors"
    tensors = load_file(shard)
    name = "model.layers.1.mlp.up_proj.weight"
    w = tensors[name].clone()
    w[400, 7] = float("nan")
    tensors[name] = w
    save_file(tensors, str(shard), metadata={"format": "pt"})
    src = ModelSource.open(bad)
    try:
        with pytest.raises(CorruptCheckpoint, match=r"up_proj.*1 NaN/Inf"):
            write_gguf(src, tmp_path / "x.gguf", "q8_0", chunk_elems=8192)
    finally:
        src.close()
    assert not (tmp_path / "x.gguf").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("qf-pipeline")]


def test_close_before_the_end_stops_every_thread(sharded):
    from quantforge.arch_hparams import resolve_arch
    from quantforge.exporters.gguf.writer import EncodedTensor, RowChunk
    from quantforge.tensor_layout import assign_types, model_shape, plan_tensors

    src = ModelSource.open(sharded)
    try:
        spec = resolve_arch(src.model_type, src.text_config)
        jobs = plan_tensors(src, spec)
        assign_types(jobs, "q8_0", model_shape(src, jobs), False, None)
        units = [RowChunk(e, a, b) for e in (EncodedTensor(src, spec, j, None, chunk_elems=4096) for j in jobs)
                 for a, b in e.ranges]
        stream = pipeline.PipelinedStream(units, ["cpu"], read_ahead=1 << 16, out_depth=1)
        first = next(stream)
        assert first.nbytes == units[0].nbytes
        stream.close()
        assert not [t for t in stream.threads if t.is_alive()]
    finally:
        src.close()
