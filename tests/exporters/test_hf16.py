"""hf16 export: clean sharded 16-bit safetensors that transformers loads with the source model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from quantforge.exporters._shards import TensorSpec, parse_size, write_sharded
from quantforge.exporters.hf16 import export_hf16

from quantforge.cli.main import main
from quantforge.errors import InputError
from quantforge.inspect import describe

from helpers.reference import tiny_llama

IDS = torch.tensor([[1, 50, 200, 17, 3, 99, 255, 2]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=1)


def _logits(folder: Path, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    with torch.no_grad():
        return model(IDS).logits


def _index(folder: Path) -> dict:
    """The shard index; a one-shard folder has none (checked), so its index is rebuilt from the file."""
    path = folder / "model.safetensors.index.json"
    if path.is_file():
        assert not (folder / "model.safetensors").exists()
        return json.loads(path.read_text())
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = sorted(f.keys())
        total = sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names)
    return {"metadata": {"total_size": total}, "weight_map": {n: "model.safetensors" for n in names}}


def _check_index(folder: Path, limit: int) -> list[str]:
    from safetensors import safe_open

    index = _index(folder)
    files = sorted(set(index["weight_map"].values()))
    total = 0
    for fname in files:
        with safe_open(str(folder / fname), "pt") as f:
            names = list(f.keys())
            assert all(index["weight_map"][n] == fname for n in names)
            size = sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names)
        assert size <= limit or len(names) == 1, fname
        total += size
    assert total == index["metadata"]["total_size"]
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    return files


def test_logits_identical_and_side_files(tiny, tmp_path) -> None:
    out = export_hf16(tiny, tmp_path / "hf16")
    assert _check_index(out, parse_size("5GB")) == ["model.safetensors"]
    assert torch.equal(_logits(out), _logits(tiny))
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny / name).read_bytes()
    report = describe(out)
    assert report.kind == "hf16" and abs(report.bpw - 16.0) < 1e-9


def test_shard_smaller_than_one_tensor(tiny, tmp_path) -> None:
    out = export_hf16(tiny, tmp_path / "hf16", max_shard_size=1000)
    files = _check_index(out, 1000)
    weight_map = _index(out)["weight_map"]
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    big = [n for n in weight_map if "proj.weight" in n or "embed" in n or "lm_head" in n]
    assert len({weight_map[n] for n in big}) == len(big)  # every tensor over the limit is alone in its shard
    assert not (out / "model.safetensors").exists()
    assert torch.equal(_logits(out), _logits(tiny))


def test_fp16_and_cli(tiny, tmp_path, capsys) -> None:
    out = tmp_path / "fp16"
    assert main(["quantize", str(tiny), "--format", "hf16", "--dtype", "fp16", "--max-shard-size", "100KB",
                 "-o", str(out)]) == 0
    assert len(_check_index(out, 100_000)) > 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float16"
    from safetensors.torch import load_file

    src = load_file(str(tiny / "model.safetensors"))
    got: dict[str, torch.Tensor] = {}
    for f in sorted(set(_index(out)["weight_map"].values())):
        got.update(load_file(str(out / f)))
    assert all(torch.equal(got[k], src[k].to(torch.float16)) for k in src)
    assert main(["quantize", str(tiny), "--format", "hf16", "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_fp16_overflow_is_an_input_error(tmp_path) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "big"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.full((4, 4), 1e6, dtype=torch.bfloat16)}, str(src / "model.safetensors"))
    with pytest.raises(InputError, match="float16 range"):
        export_hf16(src, tmp_path / "o", dtype="fp16")
    assert not (tmp_path / "o").exists()


def test_dequantizes_a_bnb4_source(tiny, tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_f
    from quantforge.exporters.bnb4 import export_bnb4
    from transformers import AutoModelForCausalLM

    q = export_bnb4(tiny, tmp_path / "bnb4", double_quant=True)
    out = export_hf16(q, tmp_path / "hf16")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    quantized = AutoModelForCausalLM.from_pretrained(q)
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not any("Linear4bit" in type(m).__name__ for m in plain.modules())
    w4 = quantized.model.layers[1].mlp.up_proj.weight
    expect = bnb_f.dequantize_4bit(w4.data, w4.quant_state).to(torch.bfloat16)
    assert torch.equal(plain.model.layers[1].mlp.up_proj.weight, expect)
    assert torch.equal(plain.lm_head.weight, quantized.lm_head.weight)


def test_write_sharded_without_layout(tmp_path) -> None:
    from safetensors.torch import load_file

    tensors = [(f"t{i}", torch.arange(i * 10, dtype=torch.float32)) for i in range(1, 6)] + \
        [("u8", torch.arange(7, dtype=torch.uint8)), ("h", torch.ones(3, dtype=torch.bfloat16))]
    index = write_sharded(iter(tensors), tmp_path, max_shard_size=130)
    files = sorted(set(index["weight_map"].values()))
    shards = [sorted(n for n, f in index["weight_map"].items() if f == name) for name in files]
    assert shards == [["t1", "t2"], ["t3"], ["t4"], ["t5"], ["h", "u8"]]
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        loaded.update(load_file(str(tmp_path / f)))
    assert all(torch.equal(loaded[n], t) for n, t in tensors)
    out = tmp_path / "lay"
    out.mkdir()
    layout = [[TensorSpec("a", torch.float32, (3,)), TensorSpec("b", torch.uint8, None, 64)]]
    write_sharded(iter([("b", torch.arange(5, dtype=torch.uint8)), ("a", torch.ones(3))]), out, "1KB", layout)
    got = load_file(str(out / "model.safetensors"))
    assert torch.equal(got["b"], torch.arange(5, dtype=torch.uint8)) and torch.equal(got["a"], torch.ones(3))


@pytest.mark.parametrize("text, value", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                         ("1.5kb", 1500), (1234, 1234), ("77", 77)])
def test_parse_size(text, value) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["5 parsecs", "", "-1MB", "0"])
def test_parse_size_rejects(text) -> None:
    with pytest.raises(InputError):
        parse_size(text)
