"""Gemma 3, Phi-3 and mixture-of-experts (Qwen3-MoE, Mixtral) checkpoints through GGUF export, llama.cpp's own
quantizer, calibration and planning. Tiny random-weight models built here with transformers: they say nothing about
quality, only that the conversion is the one llama.cpp runs."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

from quantforge.cli.main import main as cli
from quantforge.exporters.gguf import export_gguf
from quantforge.gguf_reader import load_hf_model
from quantforge.presets import get_mix
from helpers.reference import (compare_logits, ggml_quantize, hf_logits, llama_cpp_logits, llama_cpp_tokenize,
                               quantize_with_llama_cpp)

IDS = [2, 5, 17, 42, 99, 123, 256, 300, 7, 8, 9, 10, 11, 12, 200, 150, 180, 400, 20, 30]
CONFIGS = {
    # 8 experts: llama.cpp's mixes give attn_k/attn_v q8_0 and attn_output q5_k for 8-expert models
    "mixtral": dict(hidden_size=256, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None),
    "qwen3_moe": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_experts=4,
                      num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      norm_topk_prob=True, tie_word_embeddings=False),
    # LongRoPE with the long factors in use (prompt longer than the original context), partial rotary
    "phi3": dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=False, sliding_window=None, pad_token_id=None, original_max_position_embeddings=16,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                  "original_max_position_embeddings": 16,
                                  "long_factor": [1.0 + 0.25 * i for i in range(24)],
                                  "short_factor": [1.0 + 0.02 * i for i in range(24)]}),
    # 6 layers: five local (sliding window 8 < prompt, base 10k) and one global (base 1M, linear scaling x8)
    "gemma3_text": dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=64, query_pre_attn_scalar=64, sliding_window=8, num_hidden_layers=6,
                        hidden_activation="gelu_pytorch_tanh",
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}
TYPES = list(CONFIGS)
STRINGS = ["Hello world", "  two  spaces", "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
           "12345 digits 3.14159", "émoji 😀 ok", "tab\there\n\nnewlines\n\n\n",
           "The quick brown fox jumps over the lazy dog.", "", " ", "   leading", "trailing   ", "ÀÉÎÕÜ àéîõü",
           "中文字符测试", "Привет мир", "mixed CASE wOrDs", "don't can't won't", "a\tb\tc", "@#$%^&*()",
           "https://example.com/path?q=1", "x = f(y) + 2 * z", "<bos>is text here", "<eos> at start",
           "soft\u00adhyphen", "== Section ==", " @-@ wiki hyphen", "1,234,567.89", "line1\r\nline2",
           "\ufb01 ligature", "🙂🙃 two emoji", "end."]


@pytest.fixture(scope="module")
def gemma_tok(tmp_path_factory, data_dir):
    """A Gemma-style SentencePiece tokenizer: BPE with byte fallback, no dummy prefix, identity normalization,
    digits split, turn markers as user-defined pieces; saved through transformers' GemmaTokenizer."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    raw = tmp_path_factory.mktemp("gemma-spm")
    text = raw / "train.txt"
    text.write_text((data_dir / "wikitext-2" / "wiki.valid.raw").read_text(encoding="utf-8")[:200_000])
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(raw / "tokenizer"), vocab_size=600, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", input_sentence_size=20000,
        shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    (raw / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>",
        "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}))
    out = tmp_path_factory.mktemp("gemma-tok")
    AutoTokenizer.from_pretrained(raw).save_pretrained(out)
    shutil.copy(raw / "tokenizer.model", out / "tokenizer.model")
    return out


def _tiny(model_type, out, tok_dir):
    """Random bf16 checkpoint of ``model_type`` (weights wider than HF's default so logits are peaked)."""
    import sentencepiece as spm
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(tok_dir / name, out / name)
    added = [a["id"] for a in json.loads((tok_dir / "tokenizer.json").read_text())["added_tokens"]]
    vocab = max(spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model")).vocab_size(), max(added) + 1)
    kw = {"num_hidden_layers": 2, **CONFIGS[model_type]}
    kw.update(vocab_size=vocab, max_position_embeddings=512, bos_token_id=2, eos_token_id=1, initializer_range=0.1,
              rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) * 0.5 + (0.0 if model_type.startswith("gemma") else 0.75))
            elif name.endswith("mlp.gate.weight"):
                p.mul_(4.0)  # decisive routing: no near-tie between experts for f16 rounding to flip
    model.to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, gemma_tok):
    """model type -> (checkpoint, its f16 GGUF). Folder names avoid 'phi3': llama.cpp keys a token-attribute
    fix-up for Phi-3's own vocabulary on the model name."""
    root = tmp_path_factory.mktemp("archs")
    out = {}
    for mt in TYPES:
        ckpt = _tiny(mt, root / f"tiny-{mt.replace('phi3', 'p-3')}", gemma_tok)
        out[mt] = ckpt, export_gguf(ckpt, root / f"{mt}-f16.gguf", qtype="f16")
    return out


def _types(path):
    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("model_type", TYPES)
def test_logits_match_hf(models, model_type, tmp_path):
    """f16 and q8_0 files load in llama.cpp; f16 logits at every position match transformers in float32, and so do
    the weights read back from the file (the torch evaluation engine). q8_0 equals llama.cpp's own q8_0 of the f16
    file (same bytes, so the same logits) and stays close to the float model."""
    import torch

    ckpt, f16 = models[model_type]
    ref = hf_logits(ckpt, IDS)
    st = compare_logits(ref, llama_cpp_logits(f16, IDS))
    assert st["top1"] == 1.0 and st["kld"] < 1e-4, st
    with torch.no_grad():
        back = load_hf_model(f16)(torch.tensor([IDS])).logits[0].double()
    st = compare_logits(ref, back)
    assert st["top1"] == 1.0 and st["kld"] < 1e-4, st
    ours = export_gguf(ckpt, tmp_path / "q8_0.gguf", qtype="q8_0")
    theirs = tmp_path / "llama-q8_0.gguf"
    quantize_with_llama_cpp(f16, theirs, ftype=get_mix("q8_0").file_type)
    ours_r, theirs_r = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs))
    theirs_t = {t.name: t for t in theirs_r.tensors}
    for t in ours_r.tensors:
        assert np.array_equal(np.asarray(t.data), np.asarray(theirs_t[t.name].data)), t.name
    st = compare_logits(ref, llama_cpp_logits(ours, IDS))
    assert st["top1"] >= 0.8 and st["kld"] < 0.05, st  # measured: top1 >= 0.85, kld <= 0.02 (random weights)


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("mix", ["q4_k_m", "q2_k"])
def test_mix_composition_matches_llama_quantize(models, model_type, mix, tmp_path):
    ckpt, f16 = models[model_type]
    ours = export_gguf(ckpt, tmp_path / f"{mix}.gguf", qtype=mix)
    theirs = tmp_path / f"llama-{mix}.gguf"
    quantize_with_llama_cpp(f16, theirs, ftype=get_mix(mix).file_type)
    assert _types(ours) == _types(theirs)
    expert_types = {k: v for k, v in _types(ours).items() if "_exps" in k}
    assert bool(expert_types) == (model_type in ("mixtral", "qwen3_moe"))


def test_moe_imatrix_slices_per_expert(models, tmp_path):
    """An importance matrix in llama-imatrix's GGUF layout for stacked experts (``in_sum2`` {n_embd, n_expert},
    ``counts`` {1, n_expert}) reads back, and each expert is quantized with its own slice: every expert's bytes
    equal llama.cpp's ``ggml_quantize_chunk`` on that expert's rows with that slice."""
    ckpt, f16 = models["qwen3_moe"]
    rng = np.random.default_rng(0)
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(str(f16)).tensors}
    w = gguf.GGUFWriter(str(tmp_path / "imatrix.gguf"), arch="imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["random"])
    w.add_uint32("imatrix.chunk_count", 4)
    w.add_uint32("imatrix.chunk_size", 512)
    sums = {}
    for name, shape in shapes.items():
        if name.startswith("blk.") and len(shape) >= 2 and "norm" not in name and "gate_inp" not in name:
            n_mat = shape[2] if len(shape) == 3 else 1
            sums[name] = rng.lognormal(0, 1, size=(n_mat, shape[0])).astype(np.float32)
            w.add_tensor(name + ".in_sum2", sums[name])
            w.add_tensor(name + ".counts", np.full((n_mat, 1), 7.0, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = export_gguf(ckpt, tmp_path / "q4_k_m.gguf", qtype="q4_k_m", imatrix=tmp_path / "imatrix.gguf")
    ours = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    src = {t.name: t for t in gguf.GGUFReader(str(f16)).tensors}
    name = "blk.1.ffn_down_exps.weight"
    t = ours[name]
    ggml_type = int(t.tensor_type)
    weights = np.asarray(src[name].data, dtype=np.float32)  # [n_expert, rows, cols]
    got = np.asarray(t.data).reshape(weights.shape[0], weights.shape[1], -1)
    for e in range(weights.shape[0]):
        want = ggml_quantize(weights[e], ggml_type, sums[name][e] / 7.0)
        assert np.array_equal(got[e], want), e


@pytest.mark.parametrize("model_type", TYPES)
def test_calibrate_plan_quantize(models, model_type, tmp_path, data_dir):
    """calibrate -> plan -> quantize --plan completes and llama.cpp loads the result. For MoE models every stacked
    expert tensor is one planned tensor and the imatrix holds one slice and one token count per expert, counting
    each token once per expert it is routed to (llama-imatrix's MUL_MAT_ID statistics)."""
    import yaml

    from quantforge.imatrix import load_imatrix

    ckpt, _ = models[model_type]
    text = tmp_path / "calib.txt"
    text.write_text((data_dir / "wikitext-2" / "wiki.valid.raw").read_text(encoding="utf-8")[:20_000])
    cal, plan, out = tmp_path / "cal", tmp_path / "plan.yaml", tmp_path / "planned.gguf"
    assert cli(["calibrate", str(ckpt), "--data", str(text), "-o", str(cal), "--tokens", "256", "--ctx", "64",
                "--holdout-tokens", "64", "--measure", "none", "--candidates", "q4_k,q8_0", "--quiet"]) == 0
    assert cli(["plan", str(ckpt), "--calibration", str(cal), "--like", "q4_k_m", "-o", str(plan), "--quiet"]) == 0
    assert cli(["quantize", str(ckpt), "--plan", str(plan), "-o", str(out), "--quiet"]) == 0
    planned = set(yaml.safe_load(plan.read_text())["tensors"])
    llama_cpp_logits(out, IDS[:4])
    if model_type in ("mixtral", "qwen3_moe"):
        cfg = json.loads((ckpt / "config.json").read_text())
        n_exp = int(cfg.get("num_local_experts") or cfg.get("num_experts"))
        imat = load_imatrix(cal / "imatrix.gguf")
        for kind in ("gate", "up", "down"):
            name = f"blk.0.ffn_{kind}_exps.weight"
            assert name in planned
            e = imat.entries[name]
            assert e.in_sum2.shape[0] == n_exp and e.counts.shape == (n_exp,)
            assert e.counts.sum() == 256 * cfg["num_experts_per_tok"]
        gate, up = imat.entries["blk.0.ffn_gate_exps.weight"], imat.entries["blk.0.ffn_up_exps.weight"]
        assert np.array_equal(gate.in_sum2, up.in_sum2) and np.array_equal(gate.counts, up.counts)


def test_gemma_tokenizer_ids_match_hf(models, gemma_tok):
    """llama.cpp's tokenizer, from our metadata, gives the HF tokenizer's ids on 30 varied strings."""
    from transformers import AutoTokenizer

    _, f16 = models["gemma3_text"]
    tok = AutoTokenizer.from_pretrained(gemma_tok)
    want = [tok(s, add_special_tokens=False)["input_ids"] for s in STRINGS]
    got = llama_cpp_tokenize(f16, STRINGS)
    assert [(s, g) for s, g, w in zip(STRINGS, got, want, strict=True) if g != w] == []
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(f16)).fields.items() if k.startswith("tokenizer.ggml.a")}
    assert meta["tokenizer.ggml.add_space_prefix"] is False and meta["tokenizer.ggml.add_bos_token"] is True


@pytest.mark.parametrize(("model_type", "field", "value"), [
    ("qwen3_moe", "norm_topk_prob", False),
    ("qwen3_moe", "mlp_only_layers", [1]),
    ("gemma3_text", "query_pre_attn_scalar", 48),
    ("gemma3_text", "attn_logit_softcapping", 50.0),
])
def test_unsupported_variant_is_bad_input(models, model_type, field, value, tmp_path, capsys):
    """A known type with a variant llama.cpp would run differently: exit 2, one line naming the field."""
    ckpt = tmp_path / "variant"
    shutil.copytree(models[model_type][0], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert cli(["quantize", str(ckpt), "--type", "q8_0", "-o", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and "config.json" in err[0], err
    assert not (tmp_path / "x.gguf").exists()


def test_multimodal_gemma3_exports_its_text_model(gemma_tok, tmp_path, caplog):
    """A Gemma 3 image-text checkpoint (model_type gemma3, language model under a prefix) becomes the gemma3 text
    GGUF with a note that the vision tower was left out; on text its logits match the full HF model."""
    import logging

    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    added = [a["id"] for a in json.loads((gemma_tok / "tokenizer.json").read_text())["added_tokens"]]
    text = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                query_pre_attn_scalar=16, sliding_window=8, num_hidden_layers=2, vocab_size=max(added) + 1,
                max_position_embeddings=512, initializer_range=0.1, bos_token_id=2, eos_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=max(added),
                       boi_token_index=4, eoi_token_index=5)
    torch.manual_seed(0)
    ckpt = tmp_path / "mm"
    Gemma3ForConditionalGeneration(cfg).to(torch.bfloat16).save_pretrained(ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(gemma_tok / name, ckpt / name)
    with caplog.at_level(logging.INFO, logger="quantforge"):
        out = export_gguf(ckpt, tmp_path / "mm.gguf", qtype="f16")
    assert any("vision-tower" in r.getMessage() for r in caplog.records)
    names = [t.name for t in gguf.GGUFReader(str(out)).tensors]
    assert "blk.0.post_ffw_norm.weight" in names and not any(n.startswith(("v.", "mm.")) for n in names)
    model = Gemma3ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].double()
    st = compare_logits(ref, llama_cpp_logits(out, IDS))
    assert st["top1"] == 1.0 and st["kld"] < 1e-4, st



def test_stacked_expert_checkpoint_gives_the_same_tensors(models, tmp_path):
    """A checkpoint whose experts are already stacked in 3-D (``mlp.experts.gate_up_proj`` ``[E, 2*ff, H]``,
    ``mlp.experts.down_proj`` ``[E, H, ff]``, transformers 5's in-memory layout) gives the same GGUF tensors as the
    one-tensor-per-expert layout of the Hub's checkpoints."""
    import torch
    from safetensors.torch import load_file, save_file

    ckpt, _ = models["qwen3_moe"]
    fused = tmp_path / "fused"
    shutil.copytree(ckpt, fused)
    sd = load_file(ckpt / "model.safetensors")
    out = {k: v for k, v in sd.items() if ".experts." not in k}
    for i in range(2):
        p = f"model.layers.{i}.mlp.experts"
        n = sum(1 for k in sd if k.startswith(f"{p}.") and k.endswith(".down_proj.weight"))
        out[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{p}.{e}.gate_proj.weight"], sd[f"{p}.{e}.up_proj.weight"]]) for e in range(n)])
        out[f"{p}.down_proj"] = torch.stack([sd[f"{p}.{e}.down_proj.weight"] for e in range(n)])
    save_file(out, fused / "model.safetensors")
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(export_gguf(ckpt, tmp_path / "a.gguf",
                                                                               qtype="q4_k_m"))).tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(export_gguf(fused, tmp_path / "b.gguf",
                                                                               qtype="q4_k_m"))).tensors}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_llama_imatrix_moe_file_reads_back(models, tmp_path):
    """An importance matrix written by llama-imatrix itself for the tiny Qwen3-MoE model built here
    (tests/data/llama-imatrix-qwen3moe.gguf: its f16 GGUF, 8 chunks of 64 tokens of wiki.valid.raw) reads back
    with one slice and one token count per expert, each token counted once per expert it is routed to (2 of 4),
    and quantizing with it gives every expert llama.cpp's bytes for that expert's own slice."""
    from pathlib import Path

    from quantforge.imatrix import load_imatrix

    path = Path(__file__).resolve().parents[1] / "data" / "llama-imatrix-qwen3moe.gguf"
    imat = load_imatrix(path)
    assert (imat.chunk_count, imat.chunk_size) == (8, 64)
    for layer in (0, 1):
        dense = imat.entries[f"blk.{layer}.attn_q.weight"]
        assert dense.in_sum2.shape == (1, 256) and dense.counts.tolist() == [512.0]
        for kind in ("gate", "up", "down"):
            e = imat.entries[f"blk.{layer}.ffn_{kind}_exps.weight"]
            assert e.in_sum2.shape == (4, 256)
            assert e.counts.sum() == 2 * 512 and (e.counts > 0).all()
    ckpt, f16 = models["qwen3_moe"]
    out = export_gguf(ckpt, tmp_path / "q4_k_m.gguf", qtype="q4_k_m", imatrix=path)
    ours = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    src = {t.name: t for t in gguf.GGUFReader(str(f16)).tensors}
    for name in ("blk.0.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"):
        entry = imat.entries[name]
        weights = np.asarray(src[name].data, dtype=np.float32)
        got = np.asarray(ours[name].data).reshape(weights.shape[0], weights.shape[1], -1)
        for e in range(weights.shape[0]):
            want = ggml_quantize(weights[e], int(ours[name].tensor_type), entry.in_sum2[e] / entry.counts[e])
            assert np.array_equal(got[e], want), (name, e)


@pytest.mark.parametrize("model_type", TYPES)
def test_hf16_and_bnb4_exports(models, model_type, tmp_path):
    """The 16-bit export holds exactly the checkpoint's tensors, and the bnb4 export loads in transformers as it is
    and gives exactly the logits of transformers' own 4-bit quantization of the checkpoint (MoE experts stay 16-bit
    in both: transformers quantizes only nn.Linear)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from quantforge.exporters.bnb4 import export_bnb4
    from quantforge.exporters.hf16 import export_hf16

    ckpt, _ = models[model_type]
    out16 = export_hf16(ckpt, tmp_path / "hf16", dtype="bf16")
    src = {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}
    got = {k: v for f in sorted(out16.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(got) == set(src)
    assert all(torch.equal(got[k], src[k]) for k in src)
    outq = export_bnb4(ckpt, tmp_path / "bnb4", quant_type="nf4", double_quant=True)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=cfg).eval()
    ours = AutoModelForCausalLM.from_pretrained(outq).eval()
    assert any(type(m).__name__ == "Linear4bit" for m in ours.modules())
    ids = torch.tensor([IDS])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
