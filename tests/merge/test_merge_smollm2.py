"""Merging a PEFT LoRA adapter into SmolLM2-135M-Instruct: the merged checkpoint against PEFT, the merged GGUF
in llama.cpp, and base GGUF + LoRA GGUF adapter in llama.cpp against the merged GGUF; the Ollama folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.reference import llama_cpp_logits

from quantforge.cli.main import main

PROMPT = ("The capital of France is Paris. It is known for the Eiffel Tower, for museums such as the Louvre, and "
          "for its cafes. Every year, millions of tourists visit the city to see its monuments and to walk along the "
          "Seine. The river divides the city into the Left Bank and the Right Bank. Paris has been a centre of art, "
          "science and trade for centuries, and many famous writers and painters lived there. Today the city is also "
          "home to large companies, universities and research institutes. Its public transport system, the Metro, "
          "opened in 1900 and now carries millions of passengers every day. Visitors often try French bread, cheese "
          "and pastries, and many spend an afternoon in one of the parks, such as the Luxembourg Gardens, where "
          "children sail small boats on the pond while their parents read in the shade of the chestnut trees.")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def trained(smollm2_dir, tmp_path_factory):
    """A rsLoRA adapter with per-module ranks and alphas and random non-zero B, and PEFT's fp32 logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2-lora")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=True,
                                                  rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 32}))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.002)
    peft_model.save_pretrained(out / "adapter")
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(PROMPT)["input_ids"]
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(torch.tensor([ids])).logits[0].double()
        with peft_model.disable_adapter():
            base_logits = peft_model(torch.tensor([ids])).logits[0].double()
    return {"dir": out, "adapter": out / "adapter", "ids": ids, "peft": logits, "base": base_logits}


def _top1(a, b) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).double().mean())


def _lora_logits(model, adapter, ids) -> torch.Tensor:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), lora_path=str(adapter), n_ctx=256, logits_all=True, verbose=False,
                n_threads=2, n_batch=256)
    try:
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float64)
    finally:
        llm.close()


def test_hf_merge_gives_peft_logits(smollm2_dir, trained):
    """An fp32 hf16-path merge reproduces PEFT's base + adapter logits (fp32 compute), and the adapter matters."""
    from transformers import AutoModelForCausalLM

    out = trained["dir"] / "merged-hf"
    assert main(["merge", str(smollm2_dir), str(trained["adapter"]), "--format", "hf16", "--dtype", "fp32",
                 "-o", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([trained["ids"]])).logits[0].double()
    assert (logits - trained["peft"]).abs().max() < 1e-2
    assert (trained["base"] - trained["peft"]).abs().max() > 0.3


def test_merged_q8_0_gguf_in_llama_cpp(smollm2_dir, trained, tmp_path):
    """The merged q8_0 GGUF in llama.cpp agrees with base + adapter (top-1 >= 95% on a fixed prompt)."""
    merged = tmp_path / "merged-q8_0.gguf"
    assert main(["merge", str(smollm2_dir), str(trained["adapter"]), "--format", "gguf", "--type", "q8_0",
                 "-o", str(merged)]) == 0
    logits = llama_cpp_logits(merged, trained["ids"], n_ctx=256)
    assert _top1(logits, trained["peft"]) >= 0.95


def test_lora_gguf_adapter_in_llama_cpp(smollm2_dir, trained, tmp_path):
    """Base GGUF + our GGUF adapter (llama.cpp's lora_path) agrees with the merged GGUF (top-1 >= 98%), far closer
    than the base alone; both at f16, so the comparison sees the adapter, not two different roundings. The Ollama
    folder holds both files and a Modelfile naming them."""
    import gguf

    ids = trained["ids"]
    merged = tmp_path / "merged-f16.gguf"
    assert main(["merge", str(smollm2_dir), str(trained["adapter"]), "--format", "gguf", "--type", "f16",
                 "-o", str(merged)]) == 0
    folder = tmp_path / "ollama"
    assert main(["export", str(smollm2_dir), str(trained["adapter"]), "--to", "ollama", "--separate-adapter",
                 "--type", "f16", "-o", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "adapter.gguf", "model.gguf"]
    reader = gguf.GGUFReader(str(folder / "adapter.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(16.0)
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert len(shapes) == 30 * 7 * 2
    assert shapes["blk.0.attn_q.weight.lora_a"] == [576, 8] and shapes["blk.0.attn_q.weight.lora_b"] == [8, 576]
    assert shapes["blk.3.ffn_down.weight.lora_a"] == [1536, 4] and shapes["blk.3.ffn_down.weight.lora_b"] == [4, 576]
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith('FROM ./model.gguf\nADAPTER ./adapter.gguf\nTEMPLATE """')
    assert 'PARAMETER stop "<|im_end|>"' in modelfile

    merged_logits = llama_cpp_logits(merged, ids, n_ctx=256)
    lora_logits = _lora_logits(folder / "model.gguf", folder / "adapter.gguf", ids)
    base_logits = llama_cpp_logits(folder / "model.gguf", ids, n_ctx=256)
    lora_err = float((lora_logits - merged_logits).abs().max())
    base_err = float((base_logits - merged_logits).abs().max())
    assert _top1(lora_logits, merged_logits) >= 0.98
    assert lora_err < 0.2 * base_err
