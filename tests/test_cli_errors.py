"""Bad input gives exit code 2, a one-line error naming the file and problem, and no output left behind."""

from __future__ import annotations

import json
import shutil

import pytest

from quantforge.cli.main import main


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _run(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def _no_leftovers(out):
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_truncated_safetensors(smollm2_dir, tmp_path, capsys):
    model = _copy(smollm2_dir, tmp_path / "m")
    st = model / "model.safetensors"
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size // 2)
    out = tmp_path / "o.gguf"
    code, err = _run(capsys, "quantize", str(model), "--type", "q8_0", "-o", str(out))
    assert code == 2
    assert "model.safetensors" in err and "truncated" in err
    assert len(err.splitlines()) == 1
    assert _no_leftovers(out)


def test_unknown_model_type(smollm2_dir, tmp_path, capsys):
    model = _copy(smollm2_dir, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.gguf"
    code, err = _run(capsys, "quantize", str(model), "-o", str(out))
    assert code == 2 and "no_such_arch" in err
    assert _no_leftovers(out)


def test_missing_tokenizer(smollm2_dir, tmp_path, capsys):
    model = _copy(smollm2_dir, tmp_path / "m")
    (model / "tokenizer.json").unlink()
    out = tmp_path / "o.gguf"
    code, err = _run(capsys, "quantize", str(model), "-o", str(out))
    assert code == 2 and "tokenizer" in err
    assert _no_leftovers(out)


def test_existing_output_needs_force(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    code, err = _run(capsys, "quantize", str(smollm2_dir), "-o", str(out))
    assert code == 2 and "--force" in err
    assert out.read_bytes() == b"keep me"


def test_nan_weight(tmp_path, capsys, smollm2_dir):
    import torch
    from safetensors.torch import load_file, save_file

    model = _copy(smollm2_dir, tmp_path / "m")
    sd = load_file(model / "model.safetensors")
    sd["model.layers.3.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in sd.items()}, model / "model.safetensors", metadata={"format": "pt"})
    del sd, torch
    out = tmp_path / "o.gguf"
    code, err = _run(capsys, "quantize", str(model), "--type", "q8_0", "-o", str(out))
    assert code == 2 and "model.layers.3.mlp.up_proj.weight" in err and "NaN" in err
    assert _no_leftovers(out)


def test_unsupported_quant_type(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    code, err = _run(capsys, "quantize", str(smollm2_dir), "--type", "q9_z", "-o", str(out))
    assert code == 2 and "q9_z" in err
    assert _no_leftovers(out)


def test_full_disk_leaves_nothing(smollm2_dir, tmp_path, capsys, monkeypatch):
    import errno

    import gguf

    real = gguf.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def failing(self, tensor, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    out = tmp_path / "o.gguf"
    code, err = _run(capsys, "quantize", str(smollm2_dir), "--type", "f16", "-o", str(out))
    assert code == 2 and "no space left" in err
    assert _no_leftovers(out)


@pytest.mark.parametrize("path", ["does/not/exist", "/nonexistent/folder"])
def test_missing_model(tmp_path, capsys, path):
    code, err = _run(capsys, "quantize", path, "-o", str(tmp_path / "o.gguf"))
    assert code == 2 and len(err.splitlines()) == 1


def test_inspect_gguf(smollm2_gguf_f16, capsys):
    assert main(["inspect", str(smollm2_gguf_f16), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["types"] == {"f16": 211, "f32": 61}
    assert report["metadata"]["general.architecture"] == "llama"
