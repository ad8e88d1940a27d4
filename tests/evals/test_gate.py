"""Regression gate, results schema and report, without models (synthetic results documents)."""

from __future__ import annotations

import copy
import json

import pytest
from quantforge.evals import gate, report, schema

from quantforge.cli.main import main
from quantforge.errors import InputError


def _artifact(name: str, kld: float, acc: float, ppl: float = 25.0) -> dict:
    return {
        "name": name, "path": f"/x/{name}", "format": "gguf", "type": name.split(".")[0], "plan": None,
        "size_bytes": 100_000_000, "bpw": 4.9, "engine": "llama.cpp", "tokenizer_match": True,
        "metrics": {"ppl": ppl, "kld_mean": kld, "kld_median": kld / 2, "kld_p99": kld * 8, "top1": 0.9,
                    "arc_easy_acc": acc, "arc_easy_acc_stderr": 0.02, "arc_easy_acc_norm": acc - 0.05,
                    "arc_easy_acc_norm_stderr": 0.02},
    }


def _results() -> dict:
    ref = _artifact("ref", 0.0, 0.60, 22.0)
    ref.update(format="hf", type="bf16", engine="hf")
    return {
        "schema_version": 1, "quantforge_version": "0.1.0", "created": "2026-01-01T00:00:00+00:00", "seed": 1234,
        "lm_eval_version": "0.4.13",
        "settings": {"n_ctx": 512, "n_chunks": 4, "text": "wiki.test.raw", "text_name": "wiki.test.raw",
                     "text_sha256": "0", "limit": 100, "kld_base": "exact", "device": "cpu", "task_source": "local"},
        "tasks": {"arc_easy": {"lm_eval_task": "qf_arc_easy", "version": 1.0, "n_shot": 0, "n_samples": 100,
                               "source": "local"}},
        "reference": ref,
        "artifacts": [_artifact("q8_0.gguf", 0.002, 0.60), _artifact("q4_k_m.gguf", 0.05, 0.58)],
    }


LIMITS = gate.Limits(max_kld_increase=0.01, max_acc_drop=0.02)


def test_gate_passes_on_identical_results():
    res = _results()
    g = gate.compare(res, copy.deepcopy(res), LIMITS)
    assert g.passed and not g.failures and g.compared == ["q8_0.gguf", "q4_k_m.gguf"]


def test_gate_names_artifact_and_metric_that_regressed():
    base = _results()
    new = copy.deepcopy(base)
    new["artifacts"][1]["metrics"]["kld_mean"] = 0.075
    new["artifacts"][0]["metrics"]["arc_easy_acc"] = 0.55
    g = gate.compare(new, base, LIMITS)
    assert not g.passed
    found = {(f.artifact, f.metric) for f in g.failures}
    assert found == {("q4_k_m.gguf", "kld_mean"), ("q8_0.gguf", "arc_easy_acc")}
    kld = next(f for f in g.failures if f.metric == "kld_mean")
    assert kld.baseline == 0.05 and kld.value == 0.075 and kld.limit == pytest.approx(0.06)
    assert kld.line() == "REGRESSION q4_k_m.gguf kld_mean: 0.075 > limit 0.06 (baseline 0.05)"
    d = g.to_dict("old.json", LIMITS)
    assert d["passed"] is False and {"artifact", "metric", "baseline", "value", "limit"} == set(d["failures"][0])


def test_gate_within_limits_and_missing_metrics():
    base = _results()
    new = copy.deepcopy(base)
    new["artifacts"][1]["metrics"]["kld_mean"] = 0.059
    new["artifacts"][1]["metrics"]["arc_easy_acc"] = 0.565
    assert gate.compare(new, base, LIMITS).passed
    del new["artifacts"][0]["metrics"]["arc_easy_acc_norm"]
    g = gate.compare(new, base, LIMITS)
    assert [(f.artifact, f.metric, f.value) for f in g.failures] == [("q8_0.gguf", "arc_easy_acc_norm", None)]
    new["artifacts"] = [new["artifacts"][1]]
    assert gate.compare(new, base, gate.Limits(max_kld_increase=0.01)).skipped == ["q8_0.gguf"]
    with pytest.raises(InputError, match="no artifact in common"):
        new["artifacts"][0]["name"] = "other.gguf"
        gate.compare(new, base, LIMITS)
    with pytest.raises(InputError, match="at least one limit"):
        gate.compare(base, base, gate.Limits())
    with pytest.raises(InputError, match=">= 0"):
        gate.Limits(max_acc_drop=-1)


def test_optional_top1_and_relative_ppl_limits():
    base = _results()
    new = copy.deepcopy(base)
    new["artifacts"][0]["metrics"]["ppl"] = 25.0 * 1.02
    new["artifacts"][0]["metrics"]["top1"] = 0.85
    g = gate.compare(new, base, gate.Limits(max_top1_drop=0.01, max_ppl_increase=0.01))
    assert {f.metric for f in g.failures} == {"ppl", "top1"}


def test_schema_rejects_unknown_and_missing_keys(tmp_path):
    res = _results()
    schema.validate(res)
    bad = copy.deepcopy(res)
    bad["extra"] = 1
    with pytest.raises(InputError, match="unknown \\['extra'\\]"):
        schema.validate(bad)
    bad = copy.deepcopy(res)
    bad["schema_version"] = 2
    with pytest.raises(InputError, match="schema_version 1"):
        schema.validate(bad)
    bad = copy.deepcopy(res)
    del bad["artifacts"][0]["metrics"]["kld_p99"]
    with pytest.raises(InputError, match="kld_p99"):
        schema.validate(bad)
    p = tmp_path / "r.json"
    p.write_text("{not json")
    with pytest.raises(InputError, match="not a JSON"):
        schema.load(p)


def test_report_writes_json_table_and_png(tmp_path):
    res = _results()
    res["artifacts"][0]["metrics"]["top1"] = float("nan")
    out = tmp_path / "results.json"
    paths = report.write(res, out)
    assert [p.name for p in paths] == ["results.json", "results.md", "results.png"]
    doc = json.loads(out.read_text())
    assert doc["artifacts"][0]["metrics"]["top1"] is None
    table = (tmp_path / "results.md").read_text()
    assert "| q4_k_m.gguf | gguf | q4_k_m |" in table and "arc_easy_acc %" in table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="already exists"):
        report.write(res, out)
    assert not list(tmp_path.glob("*.partial"))


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return str(path)


def test_cli_gate_only_passes_on_identical_files(tmp_path, capsys):
    new = _write(tmp_path / "new.json", _results())
    old = _write(tmp_path / "old.json", _results())
    before = (tmp_path / "new.json").read_bytes()
    rc = main(["eval", "--gate-only", new, "--baseline", old, "--max-kld-increase", "0.01", "--max-acc-drop", "0.02"])
    assert rc == 0
    assert "gate passed" in capsys.readouterr().err
    assert (tmp_path / "new.json").read_bytes() == before  # without -o nothing is written
    gated = tmp_path / "gated.json"
    rc = main(["eval", "--gate-only", new, "--baseline", old, "--max-kld-increase", "0.01", "-o", str(gated)])
    assert rc == 0 and json.loads(gated.read_text())["gate"]["passed"] is True
    rc = main(["eval", "--gate-only", new, "--baseline", old, "--max-kld-increase", "0.01", "-o", new])
    assert rc == 2 and "pass --force" in capsys.readouterr().err


def test_cli_gate_only_fails_with_exit_1_on_planted_regression(tmp_path, capsys):
    planted = _results()
    planted["artifacts"][1]["metrics"]["kld_mean"] = 0.5
    new = _write(tmp_path / "new.json", planted)
    old = _write(tmp_path / "old.json", _results())
    out = tmp_path / "gated.json"
    rc = main(["eval", "--gate-only", new, "--baseline", old, "--max-kld-increase", "0.01", "-o", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "REGRESSION q4_k_m.gguf kld_mean: 0.5 > limit 0.06 (baseline 0.05)" in err
    assert "quantforge eval: error: 1 regression(s)" in err
    g = json.loads(out.read_text())["gate"]
    assert g["passed"] is False
    assert g["failures"] == [{"artifact": "q4_k_m.gguf", "metric": "kld_mean", "baseline": 0.05, "value": 0.5,
                              "limit": pytest.approx(0.06)}]


def test_cli_input_errors_exit_2(tmp_path, capsys):
    old = _write(tmp_path / "old.json", _results())
    assert main(["eval", "--gate-only", old]) == 2
    assert "needs --baseline" in capsys.readouterr().err
    assert main(["eval", "--gate-only", old, "--baseline", old]) == 2
    assert "at least one limit" in capsys.readouterr().err
    assert main(["eval", "x.gguf", "-o", str(tmp_path / "r.json")]) == 2
    assert "--reference" in capsys.readouterr().err
