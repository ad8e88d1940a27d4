"""Sensitivity under an optimized rounding mode: calibrate measures each candidate rounded as the exporter will
round it (``gptq`` through the same input second moments), keeps one table per mode cached side by side, and
``plan --optimize`` plans from that table and records the mode for the quantizer."""

from __future__ import annotations

import json

import pytest
import torch
from quantforge.calibration import sensitivity as sens
from quantforge.calibration.pipeline import CalibrationSettings, calibrate

SETTINGS = dict(tokens=256, ctx=64, holdout_tokens=128, candidates=["q4_k", "q8_0"], measure="sample",
                sample_layers=2, fisher_draws=1, proxy_rows=16)
DATA = ("wikitext-2/wiki.valid.raw", "calibration/c4_demo.jsonl")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    from helpers.reference import tiny_checkpoint

    return tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny") / "llama", smollm2_dir, init_std=0.05)


@pytest.fixture(scope="module")
def both(tmp_path_factory, tiny, data_dir):
    """One folder calibrated under the default rounding, then under gptq."""
    out = tmp_path_factory.mktemp("cal") / "cal"
    data = [data_dir / d for d in DATA]
    rtn = calibrate(tiny, data, out, CalibrationSettings(**SETTINGS))
    gptq = calibrate(tiny, data, out, CalibrationSettings(**SETTINGS, rounding="gptq"))
    return out, data, rtn, gptq


def test_each_mode_has_its_own_cached_table(both, tiny):
    out, data, rtn, gptq = both
    assert not rtn.sensitivity_reused and not gptq.sensitivity_reused and gptq.imatrix_reused
    assert "hessians" in gptq.seconds
    for f in ("sensitivity.json", "sensitivity-gptq.json", "sensitivity-gptq.png", "hessians.safetensors"):
        assert (out / f).is_file(), f
    assert calibrate(tiny, data, out, CalibrationSettings(**SETTINGS)).sensitivity_reused
    assert calibrate(tiny, data, out, CalibrationSettings(**SETTINGS, rounding="gptq")).sensitivity_reused
    plain = json.loads((out / "sensitivity.json").read_text())
    opt = json.loads((out / "sensitivity-gptq.json").read_text())
    assert plain["settings"]["rounding"] == "rtn" and opt["settings"]["rounding"] == "gptq"
    # the same pairs are measured; the q4_k ones differ (other codes), q8_0 ones too (error feedback applies)
    name = "blk.1.ffn_down.weight"
    a, b = plain["tensors"][name]["candidates"], opt["tensors"][name]["candidates"]
    assert a["q4_k"]["measured_kld"] != b["q4_k"]["measured_kld"]
    assert a["q4_k"]["proxy_imatrix"] != b["q4_k"]["proxy_imatrix"]


def test_gptq_measurement_equals_the_exported_rounding(both, tiny, data_dir):
    """The measured KLD of a pair is what the model gives with that tensor rounded by the exporter's gptq
    rounder (same bytes), run whole."""
    from quantforge.calibration.data import load_chunks
    from quantforge.formats import get_format
    from quantforge.imatrix import load_imatrix
    from quantforge.rounding import build_rounders
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, data, *_ = both
    imat = load_imatrix(out / "imatrix.gguf")
    table = json.loads((out / "sensitivity-gptq.json").read_text())
    chunks = load_chunks(data, AutoTokenizer.from_pretrained(tiny), 256, 64, 128).holdout
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ids = torch.tensor(chunks)
    with torch.no_grad():
        base = torch.log_softmax(model(ids).logits.float(), -1)
        v_types = [t for t, c in table["tensors"]["blk.0.attn_v.weight"]["candidates"].items() if "measured_kld" in c]
        for name, hf, fmt in (("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj", "q4_k"),
                              ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj", v_types[0])):
            rounder = build_rounders({name: fmt}, "gptq", hessians=out / "hessians.safetensors")[name]
            mod = model.get_submodule(hf)
            orig = mod.weight.data.clone()
            im = torch.tensor(imat.for_tensor(name))
            mod.weight.data = get_format(fmt).dequantize(rounder(orig, im)).reshape(orig.shape)
            got = sens.mean_kld(base, model(ids).logits)
            mod.weight.data = orig
            assert table["tensors"][name]["candidates"][fmt]["measured_kld"] == pytest.approx(got, rel=1e-3), name


def test_plan_reads_the_mode_table_and_records_the_mode(both, tiny, tmp_path, capsys):
    from quantforge.cli.main import main as qf
    from quantforge.plan import load_plan

    out, *_ = both
    plans = {}
    for mode in (None, "gptq"):
        path = tmp_path / f"plan-{mode}.yaml"
        extra = ["--optimize", mode] if mode else []
        assert qf(["plan", str(tiny), "--calibration", str(out), "--bpw", "4.6", "-o", str(path), *extra]) == 0
        plans[mode] = load_plan(path)
    assert "--calibration" in capsys.readouterr().out
    assert not plans[None].optimize_modes()
    modes = plans["gptq"].optimize_modes()
    assert modes and set(modes.values()) == {"gptq"} and set(modes) == set(plans["gptq"].tensors)
    # at this size the two tables lead to other choices (the gptq table is the one read)
    assert plans["gptq"].predicted["kld_sum"] != plans[None].predicted["kld_sum"]


def test_hessian_proxy_is_the_mean_output_error_and_has_the_imatrix_as_diagonal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g) @ (torch.eye(24) + 0.5 * torch.randn(24, 24, generator=g))
    dw = 0.01 * torch.randn(10, 24, generator=g)
    h = x.t() @ x / x.shape[0]
    out = float((x.double() @ dw.double().t()).pow(2).sum(1).mean())
    assert sens.hessian_proxy(dw, h) == pytest.approx(out, rel=1e-5)
    diag = torch.diag(torch.diagonal(h))
    assert sens.hessian_proxy(dw, diag) == pytest.approx(sens.imatrix_proxy(dw, torch.diagonal(h)), rel=1e-6)
