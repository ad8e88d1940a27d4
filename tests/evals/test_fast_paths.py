"""The shortcuts of the default evaluation give the plain computation's numbers: llama.cpp and transformers
computing the output layer for the scored rows only, the artifact description read from the GGUF header alone,
and the default thread count taken from the idle cores."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from quantforge.evals import data, threads


@pytest.fixture(scope="module")
def text(data_dir):
    return data.wikitext2_test().read_text(encoding="utf-8")[:4000]


def test_llamacpp_scored_rows_equal_a_pass_with_every_rows_logits(q4_llamacpp, text):
    engine = q4_llamacpp
    seq = engine.encode(text)[:96]
    got = engine.logits([seq], [48])[0]
    llm = engine.llm
    llm.n_tokens = 0
    llm.eval(seq)  # llama-cpp-python's own pass, every row's logits (logits_all)
    full = torch.from_numpy(np.array(llm.scores[48:96], dtype=np.float32))
    assert got.shape == (48, engine.vocab_size)
    assert torch.equal(got, full)
    # what the pass leaves in the context does not leak into the next request (lm-eval's prefix reuse)
    longer = seq + engine.encode(" and", add_special=False)
    engine.logits([seq], [48])
    after_fresh = engine.logits([longer], [95], reuse=True)[0]
    engine.logits([seq[:40]], [0], reuse=True)
    assert torch.equal(engine.logits([longer], [95], reuse=True)[0], after_fresh)


def test_transformers_scored_rows_equal_the_whole_forward(hf_engine, text):
    seq = hf_engine.encode(text)[:128]
    got = hf_engine.logits([seq], [64])[0]
    with torch.inference_mode():
        full = hf_engine.model(input_ids=torch.tensor([seq])).logits[0, 64:]
    assert torch.equal(got, full)  # float32, one thread: the 64-row output matmul equals those rows of 128


def test_artifact_description_from_the_header_equals_the_full_reader(smol_gguf):
    from quantforge.evals.artifacts import _gguf_report, describe_artifact

    from quantforge.inspect import describe, mix_label

    path = smol_gguf("q4_k_m")
    full = describe(path)  # gguf-py's reader: every field decoded, vocabulary arrays included
    fast = _gguf_report(path)
    assert fast.tensors == full.tensors
    assert set(fast.metadata) == set(full.metadata)
    for key, value in full.metadata.items():
        if isinstance(value, str) and value.endswith("..."):
            assert str(fast.metadata[key]).startswith(value[:-3]), key  # describe shortens long strings
        else:
            assert fast.metadata[key] == value, key
    assert mix_label(fast) == mix_label(full) == "q4_k_m"
    entry = describe_artifact(path)
    assert entry["type"] == "q4_k_m" and entry["bpw"] == round(full.bpw, 4)


def test_idle_cores_from_two_samples_of_proc_stat(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    samples = iter([(100, 1000), (160, 1100)])  # 60 of 100 jiffies idle
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    assert threads.idle_cores(window=0) == pytest.approx(1.2)
    monkeypatch.setattr(threads, "_cpu_times", lambda: None)  # no /proc/stat: the load average
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.5, 0.0, 0.0))
    assert threads.idle_cores(window=0) == pytest.approx(0.5)


@pytest.mark.parametrize(("cores", "idle", "expected"), [(2, 1.8, 2), (2, 1.2, 1), (2, 0.0, 1), (32, 30.0, 8)])
def test_default_threads_are_the_idle_cores_within_bounds(monkeypatch, cores, idle, expected):
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads, "idle_cores", lambda window=0.0: idle)
    assert threads.default_threads() == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_proc_stat_gives_idle_and_total_jiffies():
    idle, total = threads._cpu_times()
    assert 0 <= idle <= total
    assert 0.0 <= threads.idle_cores(window=0.05) <= threads.usable_cores()
