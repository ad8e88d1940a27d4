"""PEFT LoRA adapters: reading (ranks, scales, embeddings, modules_to_save), the merged model source against
PEFT's own merge, and the refusals (DoRA, IA3, another base, an untranslatable chat template)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.reference import tiny_llama

from quantforge.adapters import LoraAdapter
from quantforge.cli.main import main
from quantforge.errors import AdapterMismatch, UnsupportedAdapter
from quantforge.merged_source import MergedSource
from quantforge.model_source import ModelSource

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]


def _peft(base_dir, out, seed=0, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_" in name:  # PEFT starts embedding LoRA with A = 0
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(out)
    return peft_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model = _peft(tiny, out, r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=True,
                       rank_pattern={"down_proj": 4, "embed_tokens": 2}, alpha_pattern={"o_proj": 4},
                       modules_to_save=["model.norm"])
    return out, peft_model


def test_ranks_and_scales_match_peft(adapter):
    """rsLoRA, rank_pattern and alpha_pattern give every module PEFT's own rank and scaling."""
    path, peft_model = adapter
    lora = LoraAdapter.load(path)
    peft_modules = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
                    if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    assert set(peft_modules) == {m.module for m in lora.modules.values()}
    for mod in lora.modules.values():
        assert mod.rank == peft_modules[mod.module].r["default"]
        assert mod.scale == pytest.approx(peft_modules[mod.module].scaling["default"], rel=1e-12)
    assert {m.rank for m in lora.modules.values()} == {2, 4, 8}
    assert lora.modules["model.embed_tokens.weight"].embedding
    # modules_to_save, and the embeddings' own weights PEFT saves when they carry LoRA
    assert sorted(lora.replacements) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]


def test_merged_source_equals_peft_merge(tiny, adapter):
    """Every tensor the merged source yields equals PEFT's merge_and_unload (fp32) to float32 rounding,
    the embedding's transposed delta and the modules_to_save replacement included."""
    path, peft_model = adapter
    merged = peft_model.merge_and_unload(safe_merge=True).state_dict()
    src = MergedSource.open_merged(tiny, path)
    changed = 0
    for name in src.tensor_names():
        ours = src.get(name).to(torch.float32)
        theirs = merged[name].to(torch.float32)
        assert (ours - theirs).abs().max() <= 2e-6 * theirs.abs().max(), name
        changed += not torch.equal(ours, ModelSource.get(src, name).to(torch.float32))
    assert changed == len(LoraAdapter.load(path).modules) + 1  # every LoRA target and model.norm
    rows = src.get("model.layers.0.self_attn.q_proj.weight", rows=(3, 7))
    assert torch.equal(rows, src.get("model.layers.0.self_attn.q_proj.weight")[3:7])


def test_bnb4_and_hf16_merges(tiny, adapter, tmp_path):
    """The bitsandbytes exporter quantizes the merged weight (cast to its compute dtype) and the 16-bit one
    rounds it once, through the same merged source."""
    from quantforge.kernels.nf4 import quantize_4bit
    from safetensors import safe_open

    path, _ = adapter
    assert main(["merge", str(tiny), str(path), "--format", "bnb4", "-o", str(tmp_path / "bnb4")]) == 0
    assert main(["merge", str(tiny), str(path), "--format", "hf16", "-o", str(tmp_path / "hf16")]) == 0
    name = "model.layers.0.mlp.up_proj.weight"
    merged = MergedSource.open_merged(tiny, path).get(name)
    with safe_open(tmp_path / "bnb4" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor(name), quantize_4bit(merged.to(torch.bfloat16), "nf4")[0])
    with safe_open(tmp_path / "hf16" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor(name), merged.to(torch.bfloat16))
        assert torch.equal(f.get_tensor("model.norm.weight"),
                           LoraAdapter.load(path).replacements["model.norm.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("fmt", ["nf4", "q8_0"])
def test_merge_onto_quantized_base(tiny, adapter, fmt):
    """--base quantized: the delta lands on the dequantized quantized base (NF4 with double quantization, as
    QLoRA trains), not on the 16-bit weights."""
    from quantforge.kernels.merge import merge_reference
    from quantforge.kernels.qweight import QuantWeight

    path, _ = adapter
    src = MergedSource.open_merged(tiny, path, base="quantized", base_format=fmt)
    name = "model.layers.1.mlp.down_proj.weight"
    mod = src.adapter.modules[name]
    qw = QuantWeight.quantize(ModelSource.get(src, name).to(torch.float32), fmt, double_quant=True)
    want = merge_reference(qw, mod.a, mod.b, mod.scale)
    got = src.get(name)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    original = MergedSource.open_merged(tiny, path).get(name)
    assert (got - original).abs().max() > 100 * (got - want).abs().max()


def test_refused_adapter_types(tiny, tmp_path):
    """DoRA and IA3 are refused by name; so is a PEFT config of another type."""
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    _peft(tiny, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(UnsupportedAdapter, match="DoRA"):
        LoraAdapter.load(tmp_path / "dora")
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    get_peft_model(model, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
                   ).save_pretrained(tmp_path / "ia3")
    with pytest.raises(UnsupportedAdapter, match="IA3"):
        LoraAdapter.load(tmp_path / "ia3")


def test_adapter_for_another_base(tiny, adapter, tmp_path):
    """A module whose base tensor is missing, or has another shape, is named."""
    path, _ = adapter
    renamed = tmp_path / "renamed"
    shutil.copytree(path, renamed)
    from safetensors.torch import load_file, save_file

    tensors = load_file(renamed / "adapter_model.safetensors")
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(tensors, renamed / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatch, match="model.layers.7"):
        LoraAdapter.load(renamed).check_base(MergedSource.open(tiny).tensors)
    cfg = json.loads((tiny / "config.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    cfg["intermediate_size"] = 256
    (other / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(
        __import__("transformers").AutoConfig.from_pretrained(other)).to(torch.bfloat16).save_pretrained(other)
    with pytest.raises(AdapterMismatch, match=r"mlp\.(gate|up|down)_proj.*shape"):
        LoraAdapter.load(path).check_base(MergedSource.open(other).tensors)


def test_cli_bad_input_exits_2_and_writes_nothing(tiny, adapter, tmp_path, capsys):
    """merge/export with a refused adapter, a mismatched base or an untranslatable chat template: exit 2,
    one line naming the problem, no output."""
    path, _ = adapter
    _peft(tiny, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    out = tmp_path / "out"
    assert main(["merge", str(tiny), str(tmp_path / "dora"), "--format", "hf16", "-o", str(out)]) == 2
    assert "DoRA" in capsys.readouterr().err and not out.exists()
    renamed = tmp_path / "renamed"
    shutil.copytree(path, renamed)
    cfg = json.loads((renamed / "adapter_config.json").read_text())
    cfg["peft_type"] = "LOHA"
    (renamed / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["merge", str(tiny), str(renamed), "--format", "gguf", "--type", "q8_0", "-o", str(out)]) == 2
    assert "LOHA" in capsys.readouterr().err and not out.exists()
    dated = tmp_path / "dated"
    shutil.copytree(tiny, dated)
    (dated / "chat_template.jinja").write_text("{{ strftime_now('%d %b %Y') }}{% for m in messages %}"
                                               "{{ m['content'] }}{% endfor %}")
    assert main(["export", str(dated), str(path), "--to", "ollama", "-o", str(out)]) == 2
    assert "strftime_now" in capsys.readouterr().err and not out.exists()
    assert not list(tmp_path.glob(".out*"))
