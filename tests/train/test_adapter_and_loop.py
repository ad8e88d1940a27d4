"""Adapter files in PEFT's format, exact resume, the CLI's errors, and a short real run on SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

from quantforge.cli.main import main
from quantforge.train import TrainConfig, load_model, load_tokenizer, train
from quantforge.train.adapter import save_adapter
from quantforge.train.attention import PackInfo
from quantforge.train.lora import LoraSpec


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_saved_adapter_loads_in_peft_and_matches(arch, tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), rslora=arch == "gemma2")
    ours = load_model(tiny_models[arch], base_format="f32", dtype="f32", device="cpu", lora=spec).eval()
    with torch.no_grad():
        for m in ours.lora_modules().values():
            m.lora_B.normal_(0, 0.1)
    save_adapter(ours, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_models[arch]) and cfg["r"] == 4
    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32, attn_implementation="eager")
    peft = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, 96, (11,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = peft(input_ids=ids[None]).logits[0]
        got = ours.logits(ours(ids, torch.arange(11), PackInfo.from_lengths([11], "cpu")))
        base = hf.get_base_model()(input_ids=ids[None]).logits[0] if hasattr(hf, "get_base_model") else None
    assert (got - ref).abs().max().item() < 1e-3
    assert base is None or (ref - base).abs().max().item() > 1e-2


def _records(n):
    return [{"instruction": f"Say the number {i} in words.", "output": f"The number is {i}, written out."}
            for i in range(n)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_resume_after_interruption_equals_uninterrupted_run(tiny_chat_model, tmp_path):
    """A run interrupted after step 4 (last checkpoint at step 3) and resumed reaches the same adapter at step 5."""
    data = _jsonl(tmp_path / "d.jsonl", _records(12))
    cfg = TrainConfig(rank=4, alpha=8.0, dropout=0.1, lr=1e-2, max_steps=5, batch_tokens=128, max_seq_len=64,
                      grad_accum=2, save_steps=3, eval_split=0.1, warmup=2)
    tok = load_tokenizer(tiny_chat_model)

    def fresh():
        return load_model(tiny_chat_model, lora=cfg.lora_spec(), base_format="f32", dtype="f32", device="cpu")

    full = train(fresh(), tok, data, cfg, tmp_path / "full")

    def stop_at_4(rec):
        if rec.get("step") == 4 and "loss" in rec:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(fresh(), tok, data, cfg, tmp_path / "cut", on_step=stop_at_4)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-0000003"]
    resumed = train(fresh(), tok, data, cfg, tmp_path / "cut", resume=tmp_path / "cut")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.eval_loss == full.eval_loss
    log = [json.loads(x) for x in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5]
    assert log[-1]["eval_loss"] == full.eval_loss
    with pytest.raises(Exception, match="other settings"):
        train(fresh(), tok, data, TrainConfig(**{**cfg.to_dict(), "lr": 1e-3}), tmp_path / "cut",
              resume=tmp_path / "cut" / "checkpoints" / "step-0000003")


def test_cli_bad_input_exits_2_with_one_line(tiny_chat_model, tmp_path, capsys):
    empty = _jsonl(tmp_path / "e.jsonl", [{"text": ""}])
    assert main(["train", str(tiny_chat_model), "--data", str(empty), "-o", str(tmp_path / "o"),
                 "--base-format", "f32", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable examples" in err[0]
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\ntarget: bnb4\nskip_modules: [model.layers.7.mlp.down_proj]\n")
    data = _jsonl(tmp_path / "d.jsonl", _records(4))
    assert main(["train", str(tiny_chat_model), "--data", str(data), "-o", str(tmp_path / "o"), "--plan",
                 str(plan), "--device", "cpu"]) == 2
    assert "another model" in capsys.readouterr().err


def test_cli_trains_with_a_plan_and_writes_the_adapter(tiny_chat_model, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\ntarget: bnb4\nquant_type: nf4\ndouble_quant: true\n"
                    "skip_modules: [model.layers.1.mlp.down_proj]\n")
    data = _jsonl(tmp_path / "d.jsonl", _records(10))
    out = tmp_path / "adapter"
    assert main(["train", str(tiny_chat_model), "--data", str(data), "-o", str(out), "--plan", str(plan),
                 "--device", "cpu", "--max-steps", "2", "--batch-tokens", "256", "--max-seq-len", "128",
                 "--rank", "4", "--targets", "q_proj", "down_proj"]) == 0
    assert "held-out loss" in capsys.readouterr().out
    info = json.loads((out / "quantforge_adapter.json").read_text())
    assert info["layout"]["plan"]["skip_modules"] == ["model.layers.1.mlp.down_proj"]
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["down_proj", "q_proj"]
    assert main(["train", str(tiny_chat_model), "--data", str(data), "-o", str(out), "--device", "cpu"]) == 2


def test_thirty_steps_on_smollm2_lower_the_held_out_loss(smollm2_dir, data_dir, tmp_path):
    rows = [json.loads(x) for x in (data_dir / "dolly" / "dolly_5k.jsonl").read_text().splitlines()[:1500]]
    tok = load_tokenizer(smollm2_dir)
    cfg = TrainConfig(rank=8, alpha=16.0, lr=2e-3, max_steps=30, batch_tokens=64, max_seq_len=64,
                      eval_split=0.05, targets=("q_proj", "v_proj", "o_proj", "down_proj"),
                      gradient_checkpointing=False, schedule="constant")
    import datasets

    model = load_model(smollm2_dir, lora=cfg.lora_spec(), base_format="f32", dtype="f32", device="cpu")
    result = train(model, tok, datasets.Dataset.from_list(rows), cfg, tmp_path / "smol")
    assert result.data["eval_examples"] >= 2
    assert result.eval_loss < result.initial_eval_loss - 0.05, (result.initial_eval_loss, result.eval_loss)
