"""Sequential statistics (``calibrate --sequential``): the correction is the least-squares target for the
quantized model's inputs, the saved file is what ``quantize --optimize gptq`` reads (bytes reproducible, tensor
types checked), and the compensated rounding lowers the output error on the quantized inputs."""

from __future__ import annotations

import pytest
import torch
from quantforge.calibration.pipeline import CalibrationSettings, calibrate
from quantforge.calibration.sequential import FILE, calibrate_sequential, correction
from quantforge.exporters.gguf import export_gguf
from quantforge.rounding import make_rounder
from quantforge.rounding.hessians import Hessians

SETTINGS = dict(tokens=4096, ctx=256, holdout_tokens=256, candidates=["q4_k"], measure="sample", sample_layers=1,
                fisher_draws=1, proxy_rows=16)


def _inputs(n: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float inputs ``x_f`` (correlated, unevenly scaled) and ``x_q``: the same with an error that depends on them."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n, dtype=torch.float64) + torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5
    xf = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix
    xf *= torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
    err = xf @ (0.05 * torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5)
    return xf, xf + err + 0.01 * torch.randn(tokens, n, generator=g, dtype=torch.float64)


def test_correction_is_the_least_squares_target():
    """``Σ ‖W x_f − Ŵ x_q‖²`` minus ``‖(W + W D − Ŵ) x_q‖²`` is one constant for every ``Ŵ`` (undamped), and the
    correction vanishes when the two streams agree."""
    n, tokens = 64, 2048
    xf, xq = _inputs(n, tokens, 0)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, n, generator=g, dtype=torch.float64)
    h, c = xq.t() @ xq / tokens, xf.t() @ xq / tokens
    target = w + w @ correction(c, h, damp=1e-12)
    gaps = []
    for seed in range(3):
        w_hat = w + 0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(10 + seed), dtype=w.dtype)
        true = ((xf @ w.t() - xq @ w_hat.t()) ** 2).sum() / tokens
        gaps.append(float(true - ((xq @ (target - w_hat).t()) ** 2).sum() / tokens))
    assert max(gaps) - min(gaps) < 1e-9 * abs(gaps[0]) + 1e-9
    assert torch.equal(correction(h, h), torch.zeros_like(h))


@pytest.mark.parametrize(("fmt", "bound"), [("q4_k", 0.5), ("q6_k", 0.08), ("q3_k", 0.83), ("q8_0", 0.03)])
def test_compensated_rounding_lowers_the_output_error_on_quantized_inputs(fmt, bound):
    """A weight whose inputs carry an upstream error: gptq on ``W + W D`` fitted to the quantized inputs' ``H``
    ends closer to the float output ``W x_f`` than gptq on ``W`` fitted to the float inputs' ``H``, on held-out
    tokens (measured ratios of the two errors at the default ridge: q4_k 0.47, q6_k 0.07, q3_k 0.81, q8_0 0.02;
    the finer the type, the more of the error is the upstream one, which only the correction removes)."""
    n, tokens = 256, 8192
    xf, xq = _inputs(n, 2 * tokens, 3)
    w = torch.randn(64, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.05
    fit_f, fit_q = xf[:tokens], xq[:tokens]
    h_f, h_q, c = (fit_f.t() @ fit_f / tokens, fit_q.t() @ fit_q / tokens, fit_f.t() @ fit_q / tokens)
    d = correction(c, h_q).float()
    from quantforge.formats import get_format

    q = get_format(fmt)
    plain = q.dequantize(make_rounder(fmt, "gptq", lambda: h_f.float(), "plain")(w.float(), None)).reshape(w.shape)
    w32 = w.float()
    comp = make_rounder(fmt, "gptq", lambda: h_q.float(), "comp")(torch.addmm(w32, w32, d), None)
    comp = q.dequantize(comp).reshape(w.shape)
    held_f, held_q = xf[tokens:], xq[tokens:]
    ref = held_f @ w.t()
    err = {k: float(((ref - held_q @ v.double().t()) ** 2).sum()) for k, v in (("plain", plain), ("comp", comp))}
    assert err["comp"] < bound * err["plain"], err


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, smollm2_dir, data_dir):
    """A tiny Llama calibrated (imatrix), then given sequential statistics for q4_k_m."""
    from helpers.rounding import tiny_llama

    root = tmp_path_factory.mktemp("seq")
    model = tiny_llama(root / "llama", smollm2_dir)
    text = root / "calib.txt"
    text.write_text((data_dir / "wikitext-2" / "wiki.valid.raw").read_text(encoding="utf-8")[:200_000])
    folder = root / "cal"
    calibrate(model, [text], folder, CalibrationSettings(**SETTINGS))
    first = calibrate_sequential(model, [text], folder, CalibrationSettings(**SETTINGS), qtype="q4_k_m")
    again = calibrate_sequential(model, [text], folder, CalibrationSettings(**SETTINGS), qtype="q4_k_m")
    return {"model": model, "text": text, "folder": folder, "first": first, "again": again}


def test_the_file_covers_every_linear_with_its_type_and_is_cached(calibrated):
    assert not calibrated["first"]["reused"] and calibrated["again"]["reused"]
    drift = calibrated["first"]["drift"]
    assert len(drift) == 2 and all(0 < x < 1 for x in drift)
    h = Hessians(calibrated["folder"] / FILE)
    linears = [f"blk.{i}.{t}.weight" for i in range(2)
               for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    assert sorted(h.types) == sorted(linears)
    assert set(h.types.values()) == {"q4_k", "q6_k"}  # checked against the written file's types below
    assert h.mode == "gptq"
    assert h.group_of("blk.1.attn_k.weight") == "blk.1.attn_q.weight"
    for name in linears:
        d, m = h.correction_for(name), h.for_tensor(name)
        assert d.shape == m.shape and torch.isfinite(d).all() and d.abs().max() > 0, name
    assert h.correction_for("token_embd.weight") is None


def test_quantize_reads_it_reproducibly_and_refuses_other_types(calibrated, tmp_path, capsys):
    import gguf
    import numpy as np

    from quantforge.cli.main import main

    model, folder = calibrated["model"], calibrated["folder"]
    imatrix = folder / "imatrix.gguf"
    api = export_gguf(model, tmp_path / "api.gguf", qtype="q4_k_m", optimize="gptq", hessians=folder / FILE,
                      imatrix=imatrix)
    again = export_gguf(model, tmp_path / "again.gguf", qtype="q4_k_m", optimize="gptq",
                        hessians=folder / FILE, imatrix=imatrix)
    assert api.read_bytes() == again.read_bytes()
    cli = tmp_path / "cli.gguf"
    assert main(["quantize", str(model), "--type", "q4_k_m", "--optimize", "gptq", "--calibration", str(folder),
                 "-o", str(cli)]) == 0
    assert cli.read_bytes() == api.read_bytes()
    rtn = export_gguf(model, tmp_path / "rtn.gguf", qtype="q4_k_m", imatrix=imatrix)
    ours, ref = gguf.GGUFReader(str(api)).tensors, {t.name: t for t in gguf.GGUFReader(str(rtn)).tensors}
    changed = [t.name for t in ours if t.tensor_type == ref[t.name].tensor_type
               and not np.array_equal(np.asarray(t.data), np.asarray(ref[t.name].data))]
    assert len(changed) == 14 and all(t.tensor_type == ref[t.name].tensor_type for t in ours)
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name.lower() for t in ours}
    assert Hessians(folder / FILE).types == {n: types[n] for n in changed}
    capsys.readouterr()
    assert main(["quantize", str(model), "--type", "q3_k_m", "--optimize", "gptq", "--calibration", str(folder),
                 "-o", str(tmp_path / "x.gguf")]) == 2
    assert "was made for other tensor types" in capsys.readouterr().err


def test_cli_calibrate_sequential(calibrated, tmp_path, capsys):
    from quantforge.cli.main import main

    base = ["calibrate", str(calibrated["model"]), "--data", str(calibrated["text"]), "-o",
            str(calibrated["folder"]), "--tokens", "4096", "--ctx", "256", "--holdout-tokens", "256",
            "--candidates", "q4_k", "--measure", "sample", "--sample-layers", "1", "--fisher-draws", "1",
            "--proxy-rows", "16"]
    capsys.readouterr()
    assert main([*base, "--sequential", "q4_k_m"]) == 0
    assert f"reused {calibrated['folder'] / FILE}" in capsys.readouterr().out
    assert main([*base, "--sequential", "q9_k"]) == 2
    assert "unknown GGUF type" in capsys.readouterr().err


def test_the_statistics_are_reproducible(calibrated, tmp_path):
    import shutil

    folder = tmp_path / "again"
    folder.mkdir()
    shutil.copy(calibrated["folder"] / "imatrix.gguf", folder / "imatrix.gguf")
    res = calibrate_sequential(calibrated["model"], [calibrated["text"]], folder, CalibrationSettings(**SETTINGS),
                               qtype="q4_k_m")
    assert not res["reused"] and res["drift"] == calibrated["first"]["drift"]
    assert (folder / FILE).read_bytes() == (calibrated["folder"] / FILE).read_bytes()


def test_tune_mode_and_missing_imatrix(calibrated, tmp_path):
    """The tuned mode in the loop records its mode (and the exporter then writes a file from it); a folder without
    the calibration's imatrix is refused with a typed error."""
    import shutil

    from quantforge.errors import MissingFile

    with pytest.raises(MissingFile, match="no imatrix"):
        calibrate_sequential(calibrated["model"], [calibrated["text"]], tmp_path, CalibrationSettings(**SETTINGS),
                             qtype="q4_k_m")
    shutil.copy(calibrated["folder"] / "imatrix.gguf", tmp_path / "imatrix.gguf")
    calibrate_sequential(calibrated["model"], [calibrated["text"]], tmp_path, CalibrationSettings(**SETTINGS),
                         qtype="q4_k_m", mode="tune")
    assert Hessians(tmp_path / FILE).mode == "tune"
    out = export_gguf(calibrated["model"], tmp_path / "tune.gguf", qtype="q4_k_m", optimize="tune",
                      hessians=tmp_path / FILE, imatrix=tmp_path / "imatrix.gguf")
    assert out.read_bytes()[:4] == b"GGUF"


def test_a_plan_sets_types_and_modes(calibrated, tmp_path):
    """With a plan, each tensor is rounded in the loop with the plan's type and mode; the file records the types of
    the tensors the mode rounds (a tensor the plan keeps at the default rounding is left out) and the exporter
    writes the plan from it."""
    import shutil

    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\ntarget: gguf\nbase_type: q4_k_m\ntensors:\n"
                    "  blk.0.ffn_down.weight: {type: q8_0, optimize: gptq}\n"
                    "  blk.1.attn_q.weight: {type: q3_k, optimize: rtn}\n")
    shutil.copy(calibrated["folder"] / "imatrix.gguf", tmp_path / "imatrix.gguf")
    calibrate_sequential(calibrated["model"], [calibrated["text"]], tmp_path, CalibrationSettings(**SETTINGS),
                         plan=plan)
    h = Hessians(tmp_path / FILE)
    assert h.types["blk.0.ffn_down.weight"] == "q8_0" and "blk.1.attn_q.weight" not in h.types
    assert len(h.types) == 13
    out = export_gguf(calibrated["model"], tmp_path / "plan.gguf", plan=plan, optimize="gptq",
                      hessians=tmp_path / FILE, imatrix=tmp_path / "imatrix.gguf")
    assert out.read_bytes()[:4] == b"GGUF"
