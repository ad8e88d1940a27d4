"""The 1- to 3-bit i-quants as planner candidates: calibrate measures them (only where an imatrix exists for the
tensor), ``plan --bpw 1.8``, ``--like iq2_xxs`` and ``--size-mb`` use them, the plan applies exactly and the file
runs in llama.cpp; without an imatrix the types that need one are not offered; the sensitivity plot and
``inspect`` show them.

The model is a random 2-layer Llama whose rows (256 and 512 weights) fit the 256-weight i-quant blocks
(SmolLM2's 576-wide rows do not: they fall back to IQ4_NL, as in llama.cpp).
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from helpers import reference
from helpers.reference import llama_cpp_logits
from quantforge.calibration import candidates as cand

from quantforge.cli.main import main
from quantforge.presets import CODEC_IMATRIX_TYPES, IMATRIX_TYPES


@pytest.fixture(scope="module")
def wide(tmp_path_factory, smollm2_dir):
    """A random Llama with 256-wide hidden and 512-wide MLP rows (GQA 2, tied embeddings)."""
    cfg = dict(reference.TINY_CONFIGS["llama"], hidden_size=256, intermediate_size=512)
    old = reference.TINY_CONFIGS["llama"]
    reference.TINY_CONFIGS["llama"] = cfg
    try:
        return reference.tiny_checkpoint("llama", tmp_path_factory.mktemp("wide") / "llama", smollm2_dir,
                                         init_std=0.05)
    finally:
        reference.TINY_CONFIGS["llama"] = old


@pytest.fixture(scope="module")
def calibration(wide, data_dir, tmp_path_factory):
    """``quantforge calibrate`` with the default candidates (cheap token settings)."""
    folder = tmp_path_factory.mktemp("cal") / "cal"
    text = folder.parent / "calib.txt"
    text.write_text((data_dir / "wikitext-2" / "wiki.valid.raw").read_text(encoding="utf-8")[:8000])
    assert main(["calibrate", str(wide), "--data", str(text), "-o", str(folder), "--tokens", "256", "--ctx", "64",
                 "--holdout-tokens", "64", "--fisher-draws", "1", "--proxy-rows", "64", "--sample-layers", "1"]) == 0
    return folder


def test_candidates_by_row_and_imatrix():
    wide = cand.gguf_candidates(list(cand.DEFAULT_CANDIDATES), 512)
    assert wide[:7] == ["iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "q2_k", "iq3_xxs"]
    assert wide[-1] == "f16"
    bare = cand.gguf_candidates(list(cand.DEFAULT_CANDIDATES), 512, has_imatrix=False, tensor="blk.0.ffn_up.weight")
    assert not set(bare) & set(IMATRIX_TYPES) and "iq3_s" in bare and "q2_k" in bare
    embd = cand.gguf_candidates(list(cand.DEFAULT_CANDIDATES), 512, has_imatrix=False, tensor="token_embd.weight")
    assert embd[:4] == ["iq1_m", "iq2_s", "q2_k", "iq3_xxs"]  # llama-quantize exempts token_embd; ggml needs one
    assert not set(embd) & set(CODEC_IMATRIX_TYPES)  # for these three
    narrow = cand.gguf_candidates(list(cand.DEFAULT_CANDIDATES), 576)
    assert not any(t.startswith(("iq1", "iq2", "iq3")) for t in narrow) and "iq4_nl" in narrow


def test_calibration_measures_the_i_quants(calibration):
    table = json.loads((calibration / "sensitivity.json").read_text())
    layer = table["tensors"]["blk.0.ffn_down.weight"]["candidates"]
    for t in cand.LOW_BIT_CANDIDATES:
        assert layer[t]["predicted_kld"] > layer["q4_k"]["predicted_kld"] > 0, t
    assert layer["iq1_s"]["predicted_kld"] > layer["iq3_s"]["predicted_kld"]
    assert any(rec.get("measured_kld") is not None for e in table["tensors"].values()
               for t, rec in e["candidates"].items() if t in cand.LOW_BIT_CANDIDATES)
    embd = table["tensors"]["token_embd.weight"]["candidates"]
    assert "iq1_m" in embd and not set(embd) & set(CODEC_IMATRIX_TYPES)
    assert (calibration / "sensitivity.png").stat().st_size > 0


def test_plans_at_low_bits_apply_and_run(wide, calibration, tmp_path):
    import gguf
    from quantforge.exporters.gguf import export_gguf

    from quantforge.plan import load_plan

    for flag, value in (("--bpw", "1.8"), ("--like", "iq2_xxs"), ("--size-mb", "4.5")):
        out = tmp_path / f"{flag[2:]}.yaml"
        assert main(["plan", str(wide), "--calibration", str(calibration), flag, value, "-o", str(out)]) == 0
        plan = load_plan(out)
        assert plan.predicted["tensor_bytes"] <= plan.budget["bytes"]
        if flag != "--like":  # the tied embedding takes Q5_K in llama.cpp's iq2_xxs: 5.2 bpw on this model
            assert {c.type for c in plan.tensors.values()} & set(cand.LOW_BIT_CANDIDATES), flag
    by_bpw = load_plan(tmp_path / "bpw.yaml")
    assert by_bpw.predicted["bpw"] <= 1.8
    like = load_plan(tmp_path / "like.yaml")
    ref = export_gguf(wide, tmp_path / "iq2_xxs.gguf", qtype="iq2_xxs", imatrix=calibration / "imatrix.gguf")
    assert like.budget["bytes"] == sum(int(t.n_bytes) for t in gguf.GGUFReader(str(ref)).tensors)
    assert like.predicted["kld_sum"] > 0

    planned = export_gguf(wide, tmp_path / "planned.gguf", plan=tmp_path / "bpw.yaml")
    reader = gguf.GGUFReader(str(planned))
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    assert {n: c.type for n, c in by_bpw.tensors.items()} == {n: types[n] for n in by_bpw.tensors}
    assert sum(int(t.n_bytes) for t in reader.tensors) == by_bpw.predicted["tensor_bytes"]
    logits = llama_cpp_logits(planned, [1, 504, 3458, 282, 5168, 314], n_ctx=64)
    assert bool(logits.isfinite().all())

    assert main(["inspect", str(planned), "--json", "--tensors"]) == 0


def test_inspect_shows_the_low_bit_types(wide, calibration, tmp_path, capsys):
    from quantforge.exporters.gguf import export_gguf

    planned = export_gguf(wide, tmp_path / "iq1_m.gguf", qtype="iq1_m", imatrix=calibration / "imatrix.gguf")
    capsys.readouterr()
    assert main(["inspect", str(planned), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"iq1_m", "iq2_xxs"} <= set(report["types"])


def test_no_imatrix_no_imatrix_types(wide, calibration, tmp_path):
    """A calibration folder without its imatrix: the plan offers no type that needs one."""
    bare = tmp_path / "bare"
    shutil.copytree(calibration, bare)
    (bare / "imatrix.gguf").unlink()
    out = tmp_path / "p.yaml"
    assert main(["plan", str(wide), "--calibration", str(bare), "--bpw", "2.6", "-o", str(out)]) == 0
    types = {n: c["type"] for n, c in yaml.safe_load(out.read_text())["tensors"].items()}
    layers = {t for n, t in types.items() if n.startswith("blk.")}
    assert not layers & set(IMATRIX_TYPES) and layers & {"iq3_s", "q2_k"}
    assert types["token_embd.weight"] not in CODEC_IMATRIX_TYPES
    assert main(["quantize", str(wide), "--plan", str(out), "-o", str(tmp_path / "bare.gguf")]) == 0
    assert main(["plan", str(wide), "--calibration", str(bare), "--bpw", "1.8", "-o", str(tmp_path / "q.yaml")]) == 2


def test_plot_picks_the_low_bit_panel():
    from quantforge.calibration.plot import low_bit_type

    assert low_bit_type({t: {} for t in ("iq1_s", "iq2_xxs", "iq3_s", "q4_k", "f16", "nf4")}) == "iq2_xxs"
    assert low_bit_type({t: {} for t in ("q3_k", "q4_k", "f16")}) is None
