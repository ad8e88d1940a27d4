"""``quantforge eval`` end to end on SmolLM2 (tiny settings), the gate on a run with models, and lm-eval's own CLI
through ``python -m quantforge.evals.lm_eval_main``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from quantforge.evals import schema
from quantforge.evals.lm_eval_runner import TASKS_DIR

from quantforge.cli.main import main

FAST = ["--ctx", "128", "--chunks", "1", "--threads", "1"]


def _main(argv: list[str]) -> tuple[int, str, str]:
    """``quantforge ARGV`` in process: exit code, stdout, stderr (torch's thread count restored afterwards)."""
    import torch

    threads = torch.get_num_threads()
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    torch.set_num_threads(threads)
    return rc, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, smollm2_dir, smol_gguf, smol_bnb4, data_dir):
    """One ``quantforge eval`` of a q8_0 GGUF and an nf4 folder with a task (shared by the tests below)."""
    out = tmp_path_factory.mktemp("eval") / "results.json"
    argv = ["eval", str(smol_gguf("q8_0")), str(smol_bnb4), "--reference", str(smollm2_dir), *FAST,
            "--tasks", "arc_easy", "--limit", "2", "-o", str(out)]
    rc, stdout, stderr = _main(argv)
    return {"rc": rc, "out": out, "stdout": stdout, "stderr": stderr, "argv": argv}


def test_eval_writes_versioned_results_table_and_plot(full_run):
    assert full_run["rc"] == 0, full_run["stderr"][-2000:]
    out: Path = full_run["out"]
    doc = schema.load(out)
    assert doc["schema_version"] == 1 and doc["seed"] == 1234 and doc["lm_eval_version"] == "0.4.13"
    assert doc["tasks"]["arc_easy"]["version"] == 1.0 and doc["tasks"]["arc_easy"]["source"] == "local"
    assert doc["tasks"]["arc_easy"]["n_samples"] == 2
    assert doc["reference"]["metrics"]["kld_mean"] == 0.0 and doc["reference"]["type"] == "bf16"
    q8, nf4 = doc["artifacts"]
    assert (q8["format"], q8["type"], q8["engine"]) == ("gguf", "q8_0", "llama.cpp")
    assert (nf4["format"], nf4["type"], nf4["engine"]) == ("bnb4", "nf4", "hf")
    assert q8["size_bytes"] == Path(q8["path"]).stat().st_size
    assert q8["size_bytes"] > nf4["size_bytes"] > 0 and 8 < q8["bpw"] < 9 and 4 < nf4["bpw"] < 9
    for art in (q8, nf4):
        m = art["metrics"]
        assert {"kld_mean", "kld_median", "kld_p99", "top1", "ppl", "arc_easy_acc", "arc_easy_acc_stderr"} <= set(m)
        assert m["n_tokens"] == 63 and art["tokenizer_match"] is True
    assert 0 < q8["metrics"]["kld_mean"] < nf4["metrics"]["kld_mean"]
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ") == 3 and "arc_easy_acc %" in table
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| smollm2-q8_0.gguf" in full_run["stdout"] and "| smollm2-q8_0.gguf" not in full_run["stderr"]


def test_eval_refuses_to_overwrite_without_force(full_run):
    before = full_run["out"].read_bytes()
    rc, _, err = _main(full_run["argv"])
    assert rc == 2 and "already exists; pass --force" in err
    assert full_run["out"].read_bytes() == before


def test_eval_with_baseline_exits_1_on_planted_regression(full_run, tmp_path, smollm2_dir, smol_gguf):
    q8 = smol_gguf("q8_0")
    base = json.loads(full_run["out"].read_text())
    base["artifacts"][0]["metrics"]["kld_mean"] = 0.0  # planted: the baseline q8_0 was perfect
    planted = tmp_path / "baseline.json"
    planted.write_text(json.dumps(base))
    second = tmp_path / "second.json"
    rc, _, err = _main(["eval", str(q8), "--reference", str(smollm2_dir), *FAST, "-o", str(second),
                        "--baseline", str(planted), "--max-kld-increase", "0"])
    assert rc == 1
    assert f"REGRESSION {q8.name} kld_mean:" in err
    gate = json.loads(second.read_text())["gate"]
    assert gate["passed"] is False and gate["skipped"] == [base["artifacts"][1]["name"]]
    assert [(f["artifact"], f["metric"]) for f in gate["failures"]] == [(q8.name, "kld_mean")]
    # the same run is no regression against the unplanted first run (identical settings, deterministic engines)
    rc, _, err = _main(["eval", "--gate-only", str(second), "--baseline", str(full_run["out"]),
                        "--max-kld-increase", "0"])
    assert rc == 0, err
    assert "gate passed" in err


@pytest.mark.slow
def test_lm_eval_cli_sees_our_backends(tmp_path, smol_gguf, data_dir):
    cmd = [sys.executable, "-P", "-m", "quantforge.evals.lm_eval_main", "run", "--model", "qf-gguf",
           "--model_args", f"path={smol_gguf('q8_0')},engine=llama.cpp,n_threads=1", "--tasks", "qf_winogrande",
           "--limit", "2", "--include_path", str(TASKS_DIR), "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qf_winogrande" in proc.stdout
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1
    res = json.loads(written[0].read_text())["results"]["qf_winogrande"]
    assert 0 <= res["acc,none"] <= 1
