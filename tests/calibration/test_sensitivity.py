"""Sensitivity: pure math (KLD, proxies, fit, candidates, NF4), and the calibrate stage end to end on a tiny
random Llama: measured KLDs equal a plain full-model recomputation, files are written, results are cached."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from quantforge.calibration import candidates as cand
from quantforge.calibration import sensitivity as sens
from quantforge.calibration.pipeline import CalibrationSettings, calibrate


def test_mean_kld():
    logits = torch.randn(5, 11)
    base = sens.log_probs(logits)
    assert sens.mean_kld(base, logits) == pytest.approx(0.0, abs=1e-7)
    other = torch.randn(5, 11)
    p, lq = base.exp(), torch.log_softmax(other, -1)
    assert sens.mean_kld(base, other) == pytest.approx(float((p * (base - lq)).sum(-1).mean()), rel=1e-6)


def test_proxies_are_quadratic_in_the_error():
    dw = torch.randn(8, 16)
    imat, fisher = torch.rand(16), torch.rand(8, 16)
    assert sens.imatrix_proxy(2 * dw, imat) == pytest.approx(4 * sens.imatrix_proxy(dw, imat), rel=1e-9)
    assert sens.fisher_proxy(dw, fisher, 10) == pytest.approx(float(0.05 * (fisher * dw * dw).sum()), rel=1e-6)


def test_fit_recovers_scale_and_slope():
    rng = torch.Generator().manual_seed(0)
    kinds, proxy, meas = [], [], []
    for kind, scale in (("attn_q", 0.5), ("ffn_down", 3.0)):
        for _ in range(12):
            p = float(torch.rand(1, generator=rng)) * 1e-3 + 1e-5
            kinds.append(kind)
            proxy.append(p)
            meas.append(scale * p ** 1.2 * math.exp(0.01 * float(torch.randn(1, generator=rng))))
    fit = sens.fit_proxy("fisher", kinds, proxy, meas)
    assert fit.slope == pytest.approx(1.2, abs=0.02)
    assert math.exp(fit.intercepts["ffn_down"] - fit.intercepts["attn_q"]) == pytest.approx(6.0, rel=0.05)
    assert fit.loo_rmse < 0.05 and fit.spearman > 0.9
    assert fit.predict("ffn_down", 1e-4) == pytest.approx(3.0 * 1e-4 ** 1.2, rel=0.1)


def test_candidates_respect_row_length():
    wide = cand.gguf_candidates(["q2_k", "q4_k", "q6_k", "q8_0"], 1536)
    assert wide == ["q2_k", "q4_k", "q6_k", "q8_0", "f16"]
    narrow = cand.gguf_candidates(["q2_k", "q4_k", "q6_k", "q8_0"], 576)
    assert "q4_k" not in narrow and {"q4_0", "iq4_nl", "q4_1", "q5_0", "q5_1", "q8_0"} <= set(narrow)
    assert narrow[-1] == "f16"
    assert sens.sample_types(wide) == ["q2_k", "q4_k"]
    assert sens.sample_types([*narrow[:-1], "nf4", "f16"]) == ["iq4_nl", "nf4"]
    assert sens.sample_types(narrow, whole_model=True) == ["iq4_nl", "q5_0", "q8_0"]


def test_round_trip_out_of_memory_splits_rows(monkeypatch):
    """A codec that runs out of device memory on a whole tensor gets its rows in halves, with the same values."""
    from quantforge.formats import QuantFormat

    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 512, generator=g) * 0.02
    im = torch.rand(512, generator=g) + 0.05
    whole = {t: cand.fake_quantize(w, t, im) for t in ("iq2_xxs", "q4_k")}
    real = QuantFormat.quantize
    seen: list[int] = []
    limit = [12]

    def small_only(self, weight, imatrix=None):
        seen.append(weight.shape[0])
        if weight.shape[0] > limit[0]:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(self, weight, imatrix)

    monkeypatch.setattr(QuantFormat, "quantize", small_only)
    for t, ref in whole.items():
        seen.clear()
        assert torch.equal(cand.fake_quantize(w, t, im), ref), t
        assert seen == [48, 24, 12, 12, 24, 12, 12], t
    limit[0] = 0  # not even one row fits: the error reaches the caller
    with pytest.raises(torch.OutOfMemoryError):
        cand.fake_quantize(w[:2], "q4_k", im)


def test_nf4_round_trip_matches_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(64, 192) * 0.05
    try:
        q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        ref = bnbf.dequantize_4bit(q, state)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"bitsandbytes CPU 4-bit not available ({exc})")
    assert torch.equal(cand.nf4_round_trip(w), ref.float())
    assert cand.nbytes("nf4", (64, 192)) == 64 * 192 // 2 + 4 * 64 * 192 // 64


def test_measurement_sample_covers_first_and_last_layer():
    kinds = {i: ["attn_q", "ffn_down"] for i in range(30)}
    s = sens.measurement_sample(kinds, 30, 5)
    assert {i for i, _ in s} == {0, 7, 14, 22, 29} and len(s) == 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    from helpers.reference import tiny_checkpoint

    return tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny") / "llama", smollm2_dir, init_std=0.05)


SETTINGS = dict(tokens=256, ctx=64, holdout_tokens=128, candidates=["q4_k", "q8_0", "nf4"], measure="sample",
                sample_layers=2, fisher_draws=1, proxy_rows=16)
DATA = ("wikitext-2/wiki.valid.raw", "calibration/c4_demo.jsonl")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny, data_dir):
    out = tmp_path_factory.mktemp("cal") / "cal"
    result = calibrate(tiny, [data_dir / d for d in DATA], out, CalibrationSettings(**SETTINGS))
    return out, result


def test_calibrate_writes_files_and_caches(calibrated, tiny, data_dir, tmp_path):
    out, r1 = calibrated
    assert not r1.sensitivity_reused
    for f in ("imatrix.gguf", "sensitivity.json", "sensitivity.png", "manifest.json"):
        assert (out / f).is_file()
    table = json.loads((out / "sensitivity.json").read_text())
    assert list(table["tensors"]["blk.0.ffn_down.weight"]["candidates"]) == ["q4_k", "q8_0", "nf4", "f16"]
    q = table["tensors"]["blk.0.attn_q.weight"]["candidates"]
    assert "q4_k" not in q and "q5_0" in q and q["f16"]["predicted_kld"] == 0.0
    assert all(c["predicted_kld"] >= 0 for e in table["tensors"].values() for c in e["candidates"].values())
    assert table["n_measured"] == 14 * 2 + 3 and table["fit"]["fits"]
    data = [data_dir / d for d in DATA]
    r2 = calibrate(tiny, data, out, CalibrationSettings(**SETTINGS))
    assert r2.sensitivity_reused and r2.imatrix_reused
    other = tmp_path / "cal"
    shutil.copytree(out, other)
    r3 = calibrate(tiny, data, other, CalibrationSettings(**{**SETTINGS, "measure": "none"}))
    assert r3.imatrix_reused and not r3.sensitivity_reused
    assert json.loads((other / "sensitivity.json").read_text())["n_measured"] == 0


def test_measured_kld_equals_full_model_recomputation(calibrated, tiny, data_dir):
    """The layer-cached re-run gives the same KLD as quantizing the tensor in the HF model and running it whole."""
    from quantforge.calibration.data import load_chunks
    from quantforge.imatrix import load_imatrix
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = calibrated
    imat = load_imatrix(out / "imatrix.gguf")
    table = json.loads((out / "sensitivity.json").read_text())
    chunks = load_chunks([data_dir / d for d in DATA], AutoTokenizer.from_pretrained(tiny), 256, 64, 128).holdout
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ids = torch.tensor(chunks)
    with torch.no_grad():
        base = torch.log_softmax(model(ids).logits.float(), -1)
        for name, hf, fmt in (("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj", "q4_k"),
                              ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj", "nf4"),
                              ("token_embd.weight", "model.embed_tokens", "q8_0")):
            mod = model.get_submodule(hf)
            orig = mod.weight.data.clone()
            im = imat.for_tensor(name)
            mod.weight.data = cand.fake_quantize(orig, fmt, None if im is None else torch.tensor(im))
            got = sens.mean_kld(base, model(ids).logits)
            mod.weight.data = orig
            measured = table["tensors"][name]["candidates"][fmt]["measured_kld"]
            assert measured == pytest.approx(got, rel=1e-3), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_round_trips_equal_the_host_ones_for_every_default_candidate():
    """A GPU weight's round trip (host-encoded for :data:`candidates.HOST_ENCODED`, else the GPU codec) gives the
    CPU round trip's values exactly, at both row lengths of a Llama MLP."""
    g = torch.Generator().manual_seed(5)
    for n in (512, 1792):
        w = torch.randn(48, n, generator=g) * 0.02
        im = torch.rand(n, generator=g) + 0.05
        for t in cand.DEFAULT_CANDIDATES:
            on_gpu = cand.fake_quantize(w.cuda(), t, im.cuda())
            assert on_gpu.is_cuda
            assert torch.equal(on_gpu.cpu(), cand.fake_quantize(w, t, im)), (t, n)
