"""bnb4 export: transformers loads it as-is, and it equals transformers' own on-the-fly quantization byte for byte.

SmolLM2 for the byte-equality test; a tiny random Llama (untied lm_head, attention biases)
for skip plans, fp4, sharding and bad input, to keep the suite fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from quantforge.exporters.bnb4 import export_bnb4, skip_matches  # noqa: E402

from quantforge.cli.main import main  # noqa: E402
from quantforge.errors import CorruptCheckpoint, PlanError  # noqa: E402
from quantforge.inspect import describe  # noqa: E402
from quantforge.plan import Plan, save_plan  # noqa: E402

from helpers.reference import tiny_llama  # noqa: E402

IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 2, 17]])
TINY_IDS = IDS % 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def _bnb_config(quant_type: str, double_quant: bool, skip: list[str] | None = None):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)


def _disk_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index_file = folder / "model.safetensors.index.json"
    if not index_file.is_file():  # one shard: no index, as transformers writes it
        return load_file(str(folder / "model.safetensors"))
    index = json.loads(index_file.read_text())
    out: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / fname)))
    assert set(out) == set(index["weight_map"])
    return out


def _assert_same_bytes(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    for name, t in ours.items():
        ref = theirs[name]
        assert t.dtype == ref.dtype and t.shape == ref.shape, name
        assert torch.equal(t.reshape(-1).view(torch.uint8), ref.detach().reshape(-1).view(torch.uint8)), name


def _logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("double_quant", [True, False], ids=["nf4-dq", "nf4"])
def test_smollm2_equals_transformers_quantization(smollm2_dir, tmp_path, double_quant) -> None:
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    out = export_bnb4(smollm2_dir, tmp_path / "bnb4", quant_type="nf4", double_quant=double_quant)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=_bnb_config("nf4", double_quant))
    ours = _disk_tensors(out)
    theirs = ref.state_dict()
    assert set(theirs) - set(ours) == {"lm_head.weight"}  # tied to embed_tokens, not saved by save_pretrained
    _assert_same_bytes(ours, theirs)

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(m, Linear4bit) for m in loaded.modules()) == 30 * 7
    assert torch.equal(_logits(loaded), _logits(ref))
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["bnb_4bit_use_double_quant"] is double_quant and qcfg["llm_int8_skip_modules"] == ["lm_head"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (smollm2_dir / name).read_bytes()


@pytest.mark.parametrize("quant_type, double_quant", [("fp4", True), ("nf4", False)])
def test_plan_skips_round_trip(tiny, tmp_path, quant_type, double_quant) -> None:
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    skip = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn"]
    plan = save_plan(Plan(target="bnb4", skip_modules=skip, quant_type=quant_type, double_quant=double_quant),
                     tmp_path / "plan.yaml")
    out = export_bnb4(tiny, tmp_path / "bnb4", plan=plan, max_shard_size="40KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
    loaded = AutoModelForCausalLM.from_pretrained(out)
    source = AutoModelForCausalLM.from_pretrained(tiny)
    src_modules = dict(source.named_modules())
    for name, m in loaded.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if skip_matches(name, skip + ["lm_head"]):
            assert type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16, name
            assert torch.equal(m.weight, src_modules[name].weight), name
        else:
            assert isinstance(m, Linear4bit) and m.weight.quant_state.quant_type == quant_type, name
            assert m.weight.quant_state.nested == double_quant
    ref = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=_bnb_config(quant_type, double_quant,
                                                                                    skip + ["lm_head"]))
    ours = _disk_tensors(out)
    assert set(ours) == set(ref.state_dict())
    _assert_same_bytes(ours, ref.state_dict())
    assert torch.equal(_logits(loaded, TINY_IDS), _logits(ref, TINY_IDS))
    report = describe(out)
    types = {r.name: r.type for r in report.tensors}
    assert types["model.layers.0.mlp.down_proj.weight"] == "bf16"
    assert types["model.layers.0.mlp.up_proj.weight"] == quant_type
    row = next(r for r in report.tensors if r.name == "model.layers.0.mlp.up_proj.weight")
    assert row.shape == (320, 128) and 4.0 < row.bpw < 4.8


def test_deterministic_and_force(tiny, tmp_path) -> None:
    a = export_bnb4(tiny, tmp_path / "a", double_quant=True, max_shard_size="100KB")
    b = export_bnb4(tiny, tmp_path / "b", double_quant=True, max_shard_size="100KB")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    again = export_bnb4(tiny, a, quant_type="fp4", force=True)
    assert json.loads((again / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "fp4"


def test_plan_errors(tiny, tmp_path) -> None:
    with pytest.raises(PlanError, match="model.layers.7.mlp"):
        export_bnb4(tiny, tmp_path / "o", plan=Plan(target="bnb4", skip_modules=["model.layers.7.mlp"]))
    with pytest.raises(PlanError, match="gguf"):
        export_bnb4(tiny, tmp_path / "o", plan=Plan(target="gguf"))
    assert not (tmp_path / "o").exists()


def _no_leftovers(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err.strip()


def test_cli_bad_input_exit_2(tiny, tmp_path, capsys) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    bad = Path(shutil.copytree(tiny, tmp_path / "nan"))
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    code, err = _cli(capsys, "quantize", str(bad), "--format", "bnb4", "-o", str(out))
    assert code == 2 and "model.layers.1.mlp.up_proj.weight" in err and "NaN" in err
    assert _no_leftovers(out)
    with pytest.raises(CorruptCheckpoint):
        export_bnb4(bad, out, double_quant=True)

    plan = save_plan(Plan(target="bnb4", skip_modules=["model.layers.0.mlp.no_such_proj"]), tmp_path / "p.yaml")
    code, err = _cli(capsys, "quantize", str(tiny), "--format", "bnb4", "--plan", str(plan), "-o", str(out))
    assert code == 2 and "no_such_proj" in err
    assert _no_leftovers(out)

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _cli(capsys, "quantize", str(tiny), "--format", "bnb4", "-o", str(out))
    assert code == 2 and "--force" in err
    assert (out / "keep.txt").read_text() == "mine" and not list(out.parent.glob(f".{out.name}.*"))
    code, _ = _cli(capsys, "quantize", str(tiny), "--format", "bnb4", "--double-quant", "-o", str(out), "--force")
    assert code == 0 and not (out / "keep.txt").exists()
    code, _ = _cli(capsys, "inspect", str(out))
    assert code == 0


def test_skip_matching_follows_transformers() -> None:
    from transformers.quantizers.quantizers_utils import should_convert_module

    names = ["model.layers.1.mlp.down_proj", "model.layers.11.mlp.down_proj", "model.layers.1.self_attn.q_proj",
             "lm_head", "model.layers.1.mlp.gate_proj"]
    for patterns in (["model.layers.1"], ["mlp.down_proj"], ["lm_head"], ["model.layers.1.mlp.gate"],
                     [r"model.layers.1\d.mlp"], ["1.mlp.down_proj"]):
        for name in names:
            assert skip_matches(name, patterns) == (not should_convert_module(name, patterns)), (name, patterns)
