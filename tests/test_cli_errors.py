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
    """The disk fills up part-way through the tensor data, in whichever writer the export uses (the pipelined
    writer's ``os.pwrite`` or the serial path's ``GGUFWriter.write_tensor_data``)."""
    import errno
    import os

    import gguf

    def fail_on_fifth(real):
        calls = {"n": 0}

        def failing(*a, **k):
            calls["n"] += 1
            if calls["n"] == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*a, **k)
        return failing

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_on_fifth(gguf.GGUFWriter.write_tensor_data))
    monkeypatch.setattr(os, "pwrite", fail_on_fifth(os.pwrite))
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


# Bad input is refused before any model is read: one line, exit 2, nothing written, in well under 5 s.

BAD_INPUT_SECONDS = 5.0


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to read weights, open an evaluation engine or start an export fails the test."""
    import quantforge.calibration.pipeline as calib_pipeline
    import quantforge.evals.engines as engines
    import quantforge.exporters.bnb4 as bnb4
    import quantforge.exporters.gguf as gguf_exporter

    from quantforge.model_source import ModelSource

    def loaded(*_a, **_k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(ModelSource, "get", loaded)
    monkeypatch.setattr(ModelSource, "iter_tensors", loaded)
    monkeypatch.setattr(engines, "open_engine", loaded)
    monkeypatch.setattr(gguf_exporter, "export_gguf", loaded)
    monkeypatch.setattr(bnb4, "export_bnb4", loaded)
    monkeypatch.setattr(calib_pipeline, "calibrate", loaded)


def _bad_inputs(model, tmp):
    """(case id, argv, text the one error line must contain)."""
    binary = tmp / "plan.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    folder = tmp / "somedir"
    folder.mkdir()
    bnb_plan = tmp / "bnb.yaml"
    bnb_plan.write_text("version: 1\ntarget: bnb4\nskip_modules: [lm_head]\n")
    gguf_plan = tmp / "gguf.yaml"
    gguf_plan.write_text("version: 1\ntarget: gguf\nbase_type: q4_k_m\n")
    existing = tmp / "exists.json"
    existing.write_text("{}")
    text = tmp / "t.txt"
    text.write_text("hello world\n")
    m = str(model)
    return [
        ("eval-missing-artifact", ["eval", str(tmp / "nope.gguf"), "--reference", m, "-o", str(tmp / "r.json")],
         "no such artifact"),
        ("eval-hub-task-offline", ["eval", m, "--reference", m, "--tasks", "arc_easy,mmlu", "--text", str(text),
                                   "-o", str(tmp / "r.json")], "mmlu"),
        ("eval-missing-reference", ["eval", m, "--reference", str(tmp / "nope"), "-o", str(tmp / "r.json")],
         "no such reference"),
        ("eval-missing-text", ["eval", m, "--reference", m, "--text", str(tmp / "no.txt"), "-o", str(tmp / "r.json")],
         "no.txt"),
        ("eval-bad-chunks", ["eval", m, "--reference", m, "--chunks", "-1", "-o", str(tmp / "r.json")], "--chunks"),
        ("eval-existing-output", ["eval", m, "--reference", m, "--text", str(text), "-o", str(existing)], "--force"),
        ("quantize-binary-plan", ["quantize", m, "--plan", str(binary), "-o", str(tmp / "o.gguf")], "binary"),
        ("quantize-folder-plan", ["quantize", m, "--plan", str(folder), "-o", str(tmp / "o.gguf")], "is a folder"),
        ("quantize-bnb4-plan-to-gguf", ["quantize", m, "--plan", str(bnb_plan), "-o", str(tmp / "o.gguf")],
         "target bnb4"),
        ("quantize-gguf-plan-to-bnb4", ["quantize", m, "--format", "bnb4", "--plan", str(gguf_plan),
                                        "-o", str(tmp / "o")], "target gguf"),
        ("quantize-output-slash", ["quantize", m, "-o", str(tmp / "xdir") + "/"], "names a folder"),
        ("quantize-output-folder", ["quantize", m, "-o", str(folder)], "names a folder"),
        ("quantize-type-with-bnb4", ["quantize", m, "--format", "bnb4", "--type", "q4_k_m", "-o", str(tmp / "o")],
         "--type does not apply"),
        ("quantize-plan-with-hf16", ["quantize", m, "--format", "hf16", "--plan", str(gguf_plan), "-o", str(tmp / "o")],
         "--plan does not apply"),
        ("quantize-missing-imatrix", ["quantize", m, "--imatrix", str(tmp / "im.gguf"), "-o", str(tmp / "o.gguf")],
         "im.gguf"),
        ("quantize-unknown-type", ["quantize", m, "--type", "q9_z", "-o", str(tmp / "o.gguf")], "q9_z"),
        ("calibrate-missing-data", ["calibrate", m, "--data", str(tmp / "none.txt"), "-o", str(tmp / "cal")],
         "none.txt"),
        ("calibrate-output-is-file", ["calibrate", m, "--data", str(text), "-o", str(existing)], "is a file"),
        ("plan-missing-calibration", ["plan", m, "--calibration", str(tmp / "nocal"), "--bpw", "4",
                                      "-o", str(tmp / "p.yaml")], "nocal"),
        ("plan-unknown-like", ["plan", m, "--calibration", str(folder), "--like", "q9_z", "-o", str(tmp / "p.yaml")],
         "q9_z"),
        ("inspect-missing", ["inspect", str(tmp / "nope.gguf")], "no such file"),
    ]


@pytest.mark.parametrize("index", range(21))
def test_bad_input_is_refused_before_any_model_load(index, smollm2_dir, tmp_path, capsys, no_model_load):
    import time

    case, argv, needle = _bad_inputs(smollm2_dir, tmp_path)[index]
    before = sorted(p.name for p in tmp_path.iterdir())
    t0 = time.perf_counter()
    code, err = _run(capsys, *argv)
    seconds = time.perf_counter() - t0
    assert code == 2, (case, err)
    assert len(err.splitlines()) == 1, (case, err)
    assert err.startswith(f"quantforge {argv[0]}: error: ") and needle in err, (case, err)
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, case
    assert seconds < BAD_INPUT_SECONDS, (case, seconds)


def test_bad_input_cases_are_all_run(smollm2_dir, tmp_path):
    assert len(_bad_inputs(smollm2_dir, tmp_path)) == 21


def test_unknown_model_type_names_config_json(smollm2_dir, tmp_path, capsys, no_model_load):
    model = tmp_path / "m"
    model.mkdir()
    for f in smollm2_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, model / f.name)
    (model / "model.safetensors").symlink_to(smollm2_dir / "model.safetensors")
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    (model / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, "quantize", str(model), "-o", str(tmp_path / "o.gguf"))
    assert code == 2 and len(err.splitlines()) == 1
    assert "no_such_arch" in err and str(model / "config.json") in err


def test_encoder_writing_wrong_byte_count_is_a_bug(smollm2_dir, tmp_path, capsys, monkeypatch):
    """An encoder that returns too few bytes breaks an invariant of ours: exit 3 (not 1, the gate's, nor 2, bad
    input), one line pointing at --verbose, no output left; with --verbose the traceback is shown."""
    import torch

    from quantforge.errors import BUG_EXIT_CODE
    from quantforge.formats import QuantFormat

    def short(self, weight, imatrix=None):
        return torch.zeros((weight.shape[0], self.nbytes((weight.shape[-1],)) - 1), dtype=torch.uint8)

    monkeypatch.setattr(QuantFormat, "quantize", short)
    monkeypatch.setenv("QUANTFORGE_CPU_KERNELS", "torch")
    out = tmp_path / "o.gguf"
    code, err = _run(capsys, "quantize", str(smollm2_dir), "--type", "q8_0", "-o", str(out))
    assert code == BUG_EXIT_CODE == 3
    assert len(err.splitlines()) == 1 and "internal error" in err and "--verbose" in err and "bytes" in err
    assert _no_leftovers(out)
    code, err = _run(capsys, "quantize", str(smollm2_dir), "--type", "q8_0", "-o", str(out), "--verbose")
    assert code == 3 and "Traceback (most recent call last)" in err and "InternalError" in err
    assert _no_leftovers(out)


def test_untyped_exception_is_reported_as_a_bug(smollm2_dir, capsys, monkeypatch):
    import quantforge.inspect

    def broken(path):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(quantforge.inspect, "describe", broken)
    code, err = _run(capsys, "inspect", str(smollm2_dir))
    assert code == 3 and len(err.splitlines()) == 1
    assert "internal error" in err and "ZeroDivisionError" in err and "Traceback" not in err


def test_inspect_json_into_a_closed_pipe_ends_quietly(smollm2_dir, tmp_path):
    """``quantforge inspect --json | head``: the reader is gone before the report is written (its end of the pipe
    is closed at once); the command ends with no traceback and exit 0."""
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "quantforge.cli.main", "inspect", str(smollm2_dir), "--json",
                             "--tensors"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                            env={**os.environ, "PYTHONSAFEPATH": "1"})
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert err == ""


def test_quiet_and_verbose_set_the_log_level(smollm2_dir, capsys):
    import logging

    assert main(["inspect", str(smollm2_dir), "--quiet"]) == 0
    assert logging.getLogger("quantforge").level == logging.WARNING
    assert main(["inspect", str(smollm2_dir), "--verbose"]) == 0
    assert logging.getLogger("quantforge").level == logging.DEBUG
    assert main(["inspect", str(smollm2_dir)]) == 0
    assert logging.getLogger("quantforge").level == logging.INFO
