"""Training on a GGUF layout: a mixed plan applied in memory holds exactly the bytes ``quantize --plan`` writes,
a GGUF file (ours or llama.cpp's) read directly gives the weights its bytes dequantize to, a short SmolLM2 run
lowers the held-out loss, and base GGUF + LoRA GGUF in llama.cpp computes what the trainer computed."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from helpers.reference import compare_logits, llama_cpp_logits, quantize_with_llama_cpp
from quantforge.train import TrainConfig, load_model, load_tokenizer, train
from quantforge.train.adapter import load_adapter
from quantforge.train.attention import PackInfo
from quantforge.train.gguf_base import check_base_gguf
from quantforge.train.lora import LoraSpec

from quantforge import arch as archmod
from quantforge.cli.main import main

# SmolLM2's hidden size (576) is not a multiple of 256: K-quants fit only the down projections (rows of 1536).
# Tensors the plan does not list stay float32, so the CPU run spends its time on the listed types' dequantization
# and the math, not on converting 16-bit weights at every call.
PLAN = """version: 1
target: gguf
base_type: f32
tensors:
  token_embd.weight: q8_0
  blk.0.ffn_down.weight: q4_k
  blk.1.ffn_down.weight: q3_k
  blk.2.ffn_down.weight: q6_k
  blk.0.attn_q.weight: q8_0
  blk.4.ffn_up.weight: q8_0
  blk.0.attn_k.weight: q5_0
  blk.1.attn_k.weight: f16
  blk.3.attn_v.weight: bf16
"""
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
PROMPT = ("Instruction: Name three rivers of Europe.\nResponse: The Danube, the Rhine and the Seine are three of the "
          "great rivers of Europe; the Danube flows through ten countries before it reaches the Black Sea.")
_HEADS = {"num_attention_heads": 9, "num_key_value_heads": 3}


def _file_weights(path) -> dict[str, torch.Tensor]:
    """HF name -> ``gguf.quants.dequantize`` of the file's bytes (float32, Q/K rows back in HF order)."""
    spec = archmod.arch_for("llama")
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) != 2:
            continue
        hf = archmod.hf_name(spec, t.name)
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        heads = archmod.qk_heads(spec, hf, _HEADS)
        out[hf] = archmod.unpermute_rows(w, heads) if heads else w
    return out


def _assert_held_equals_file(model, path) -> set[str]:
    """Every projection and the embedding the trainer holds equal the file's dequantized bytes exactly; returns the
    projection types."""
    ref = _file_weights(path)
    types = set()
    for name, m in model.named_modules():
        if hasattr(m, "base"):
            got = m.base.dequantize(torch.float32)
            assert torch.equal(got, ref[f"model.{name}.weight"]), (name, m.base.fmt)
            types.add(m.base.fmt)
    assert torch.equal(model.embed_tokens.detach(), ref["model.embed_tokens.weight"])
    return types


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        h = model.eval()(torch.tensor(ids), torch.arange(len(ids)), PackInfo.from_lengths([len(ids)], "cpu"))
        return model.logits(h).double()


@pytest.fixture(scope="module")
def trained(smollm2_dir, data_dir, tmp_path_factory):
    """30 steps on Dolly with the base on the plan's GGUF layout, and the plan's GGUF from ``quantize``. Module
    scoped, so it sets up before the per-test switch to the kernels' PyTorch references: it switches itself."""
    import datasets
    from quantforge.kernels._triton import triton_available

    triton_available()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        return _train_on_plan(smollm2_dir, data_dir, tmp_path_factory, datasets)


def _train_on_plan(smollm2_dir, data_dir, tmp_path_factory, datasets) -> dict:
    tmp = tmp_path_factory.mktemp("gguf-train")
    (tmp / "plan.yaml").write_text(PLAN)
    rows = [json.loads(x) for x in (data_dir / "dolly" / "dolly_5k.jsonl").read_text().splitlines()[:1500]]
    cfg = TrainConfig(rank=8, alpha=16.0, lr=2e-3, max_steps=30, batch_tokens=64, max_seq_len=64, eval_split=0.03,
                      targets=tuple(TARGETS), gradient_checkpointing=False, schedule="constant")
    model = load_model(smollm2_dir, lora=cfg.lora_spec(), base_format="gguf", plan=tmp / "plan.yaml", dtype="f32",
                       device="cpu")
    out = tmp / "adapter"
    train(model, load_tokenizer(smollm2_dir), datasets.Dataset.from_list(rows), cfg, out)
    base = tmp / "base.gguf"
    assert main(["quantize", str(smollm2_dir), "--plan", str(tmp / "plan.yaml"), "-o", str(base)]) == 0
    return {"dir": tmp, "adapter": out, "base": base, "info": json.loads((out / "quantforge_adapter.json").read_text())}


def test_thirty_steps_on_a_mixed_gguf_plan_lower_the_held_out_loss(trained):
    info = trained["info"]
    assert info["eval_loss"] < info["initial_eval_loss"] - 0.05, (info["initial_eval_loss"], info["eval_loss"])
    layout = info["layout"]
    assert layout["base_format"] == "gguf-plan" and layout["plan"]["base_type"] == "f32"
    types = {t["type"] for t in layout["tensors"].values()}
    assert {"q8_0", "q6_k", "q4_k", "q3_k", "q5_0", "f16", "bf16", "f32"} == types


def test_trainer_holds_the_bytes_quantize_writes(smollm2_dir, trained):
    """The plan applied in memory equals the file ``quantize --plan`` writes, tensor by tensor (recorded hashes),
    and the weights the trainer multiplies with equal ``gguf.quants.dequantize`` of those bytes exactly."""
    assert check_base_gguf(trained["info"]["layout"], trained["base"]) == []
    model = load_model(smollm2_dir, base_format="gguf", plan=trained["dir"] / "plan.yaml", dtype="f32",
                       device="cpu", lora=LoraSpec(rank=8, alpha=16.0, targets=tuple(TARGETS)))
    assert model.info["layout"]["base_sha256"] == trained["info"]["layout"]["base_sha256"]
    assert _assert_held_equals_file(model, trained["base"]) == {"q8_0", "q6_k", "q4_k", "q3_k", "q5_0", "f16", "bf16",
                                                                 "f32"}


def test_base_gguf_plus_lora_gguf_in_llama_cpp_is_what_was_trained(smollm2_dir, trained, tmp_path, capsys):
    """Deployment without re-quantization: llama.cpp running the plan's GGUF with the adapter as a LoRA GGUF
    gives the logits of the trained model (read back from that same file with --base-gguf), far closer than the
    base alone."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    lora = tmp_path / "adapter.gguf"
    assert main(["export", str(smollm2_dir), str(trained["adapter"]), "--to", "lora-gguf", "-o", str(lora)]) == 0
    model = load_model(smollm2_dir, base_gguf=trained["base"], dtype="f32", device="cpu",
                       lora=LoraSpec(rank=8, alpha=16.0, targets=tuple(TARGETS)))
    assert model.info["layout"]["base_sha256"] == trained["info"]["layout"]["base_sha256"]
    load_adapter(model, trained["adapter"])
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(PROMPT)["input_ids"]
    ours = _logits(model, ids)
    llm = Llama(model_path=str(trained["base"]), lora_path=str(lora), n_ctx=128, logits_all=True, verbose=False,
                n_threads=2, n_batch=128)
    try:
        llm.eval(ids)
        deployed = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float64)
    finally:
        llm.close()
    base_only = llama_cpp_logits(trained["base"], ids, n_ctx=128)
    with_lora, without = compare_logits(ours, deployed), compare_logits(ours, base_only)
    assert with_lora["top1"] >= 0.95 and with_lora["kld"] < 0.1 * without["kld"], (with_lora, without)


def test_base_gguf_written_by_llama_cpp(smollm2_dir, smollm2_gguf_f16, tmp_path):
    """A Q4_K_M file from llama.cpp's own quantizer, read directly: the weights are its bytes dequantized, and
    the trainer's model computes llama.cpp's logits on it."""
    from transformers import AutoTokenizer

    path = tmp_path / "llama-q4_k_m.gguf"
    quantize_with_llama_cpp(smollm2_gguf_f16, path, 15)
    model = load_model(smollm2_dir, base_gguf=path, dtype="f32", device="cpu", lora=LoraSpec(rank=4))
    assert {"q4_k", "q6_k"} & _assert_held_equals_file(model, path)
    assert model.info["layout"]["base_format"] == "gguf-file"
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(PROMPT)["input_ids"]
    stats = compare_logits(llama_cpp_logits(path, ids, n_ctx=128), _logits(model, ids))
    assert stats["top1"] >= 0.95 and stats["kld"] < 0.01, stats


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_gguf_bases_exit_2_with_one_line(tiny_chat_model, smollm2_dir, tmp_path, capsys):
    from quantforge.exporters.gguf import export_gguf

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    base = ["train", str(smollm2_dir), "--data", str(data), "-o", str(tmp_path / "o"), "--device", "cpu"]
    other = export_gguf(tiny_chat_model, tmp_path / "tiny.gguf", qtype="f16")
    assert main([*base, "--base-gguf", str(other)]) == 2
    assert "another model" in _one_line(capsys)

    odd = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(odd), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((576, 576 // 32 * 40), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main([*base, "--base-gguf", str(odd)]) == 2
    assert "Q8_1" in _one_line(capsys)

    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\ntarget: gguf\nbase_type: q8_0\ntensors: {blk.40.attn_q.weight: q8_0}\n")
    assert main([*base, "--plan", str(plan), "--base-format", "gguf"]) == 2
    assert "another model" in _one_line(capsys)
    plan.write_text("version: 1\ntarget: bnb4\nskip_modules: []\n")
    assert main([*base, "--plan", str(plan), "--base-format", "gguf"]) == 2
    assert "gguf plan" in _one_line(capsys)
    assert main([*base, "--base-format", "gguf"]) == 2
    assert "--plan" in _one_line(capsys)


def test_cli_round_trip_and_merged_drift_on_a_tiny_llama(tiny_chat_model, tmp_path, capsys):
    """CLI on both GGUF layouts of a tiny llama: training on the plan and on the plan's GGUF file holds the same
    bytes; the fp32 merge onto that GGUF (``merge --base-gguf``) is the trained model itself (its logits), and
    ``eval`` reports the drift of the re-quantized merge against it."""
    import json as _json

    from transformers import AutoModelForCausalLM

    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\ntarget: gguf\nbase_type: q8_0\n"
                    "tensors: {blk.0.attn_q.weight: q4_0, blk.0.attn_k.weight: q5_0, blk.1.ffn_down.weight: f16}\n")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i} it is."}) + "\n"
                            for i in range(12)))
    common = ["--data", str(data), "--device", "cpu", "--max-steps", "2", "--batch-tokens", "256",
              "--max-seq-len", "128", "--rank", "4", "--lr", "1e-2"]
    assert main(["train", str(tiny_chat_model), *common, "--plan", str(plan), "--base-format", "gguf",
                 "-o", str(tmp_path / "a")]) == 0
    base = tmp_path / "base.gguf"
    assert main(["quantize", str(tiny_chat_model), "--plan", str(plan), "-o", str(base)]) == 0
    assert main(["train", str(tiny_chat_model), *common, "--base-gguf", str(base), "-o", str(tmp_path / "b")]) == 0
    info = {k: _json.loads((tmp_path / k / "quantforge_adapter.json").read_text())["layout"] for k in "ab"}
    assert info["a"]["base_sha256"] == info["b"]["base_sha256"] and check_base_gguf(info["b"], base) == []
    assert info["b"]["base_format"] == "gguf-file" and len(info["b"]["gguf_sha256"]) == 64
    assert {t["type"] for t in info["a"]["tensors"].values()} == {"q8_0", "q4_0", "q5_0", "f16"}

    trained = tmp_path / "trained"
    assert main(["merge", str(tiny_chat_model), str(tmp_path / "b"), "--base-gguf", str(base), "--format", "hf16",
                 "--dtype", "fp32", "-o", str(trained)]) == 0
    model = load_model(tiny_chat_model, base_gguf=base, dtype="f32", device="cpu",
                       lora=LoraSpec(rank=4, alpha=16.0))
    load_adapter(model, tmp_path / "b")
    ids = list(range(5, 40))
    hf = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].double()
    assert (ref - _logits(model, ids)).abs().max() < 1e-4

    merged = tmp_path / "merged.gguf"
    assert main(["merge", str(tiny_chat_model), str(tmp_path / "b"), "--base-gguf", str(base), "--plan", str(plan),
                 "-o", str(merged)]) == 0
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i} and more words follow here." for i in range(200)))
    capsys.readouterr()
    assert main(["eval", str(merged), "--reference", str(trained), "--text", str(text), "--ctx", "64",
                 "--chunks", "2", "--no-cache", "-o", str(tmp_path / "drift.json")]) == 0
    drift = _json.loads((tmp_path / "drift.json").read_text())["artifacts"][0]["metrics"]
    assert 0 < drift["kld_mean"] < 1e-3, drift  # measured 2.9e-4: the Q8_0/Q4_0 re-quantization of the merge
