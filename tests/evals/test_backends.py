"""lm-eval backends on SmolLM2: qf-hf, qf-gguf (llama.cpp and torch engines) and qf-bnb4 agree where they must.

Tolerances: the f16 GGUF holds the bf16 checkpoint's weights exactly (bf16 -> f16 is exact for these weights), so
the three f16 backends differ only in arithmetic; 0.05 nats per request is the required bound (measured deltas are
below 0.01). Our request handling, KV-cache reuse across shared contexts included, must reproduce lm-eval's own
``HFLM`` (which recomputes every request) to float32 rounding (1e-3 nats).
"""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance
from quantforge.evals.lm_backends import from_engine

REQUESTS = [
    ("The capital of France is", " Paris"),
    ("Question: How many legs does a spider have?\nAnswer:", " eight"),
    ("The quick brown fox", " jumps over the lazy dog."),
    ("", "Hello world, this is a test."),
    ("Water boils at", " 100 degrees Celsius at sea level."),
    ("She opened the door and", " saw a cat sitting on the mat "),
    ("def add(a, b):\n   ", " return a + b"),
    ("1, 2, 3, 4,", " 5, 6"),
    # a shared context (multiple-choice shape): later choices reuse the KV cache of the first
    ("Question: Which planet of the solar system is known as the Red Planet?\nAnswer:", " Mars"),
    ("Question: Which planet of the solar system is known as the Red Planet?\nAnswer:", " Venus"),
    ("Question: Which planet of the solar system is known as the Red Planet?\nAnswer:", " the gas giant Jupiter"),
]
ROLLING = ("Robert Boulter is an English film, television and theatre actor. He had a guest starring role on "
           "the television series The Bill in 2000. This was followed by a starring role in the play Herons "
           "written by Simon Stephens, which was performed in 2001 at the Royal Court Theatre.")
TOL = 0.05
TASK_LIMIT = 40


def _ll(lm, requests=REQUESTS):
    out = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    return [v for v, _ in out], [g for _, g in out]


def _rolling(lm):
    return lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (ROLLING,), 0)])[0]


def test_three_backends_agree_on_f16_loglikelihoods(hf_engine, f16_llamacpp, f16_torch):
    results = {name: _ll(from_engine(e)) for name, e in
               (("qf-hf", hf_engine), ("qf-gguf/llama.cpp", f16_llamacpp), ("qf-gguf/torch", f16_torch))}
    ref, ref_greedy = results["qf-hf"]
    assert all(v < 0 for v in ref)
    for name, (lls, greedy) in results.items():
        deltas = [abs(a - b) for a, b in zip(lls, ref, strict=True)]
        assert max(deltas) < TOL, f"{name}: per-request |delta| {deltas}"
        assert greedy == ref_greedy, name
    rolling = {name: _rolling(from_engine(e)) for name, e in
               (("hf", hf_engine), ("llama.cpp", f16_llamacpp), ("torch", f16_torch))}
    assert max(rolling.values()) - min(rolling.values()) < TOL, rolling


def test_results_do_not_depend_on_request_order(hf_engine, q4_llamacpp):
    """Shared contexts are evaluated once, but each request is computed the same way whatever ran before it:
    llama.cpp's q4_K kernels depend on the batch shape (logits move by up to ~1), so this must be exact."""
    requests = [REQUESTS[i] for i in (0, 2, 8, 9, 10)]
    for engine in (hf_engine, q4_llamacpp):
        lm = from_engine(engine)
        together, _ = _ll(lm, requests)
        alone = [_ll(lm, [r])[0][0] for r in reversed(requests)][::-1]
        assert together == alone, type(engine).__name__


def test_qf_hf_reproduces_lm_eval_hflm(hf_engine):
    from lm_eval.models.huggingface import HFLM

    ours, ours_greedy = _ll(from_engine(hf_engine))
    theirs, theirs_greedy = _ll(HFLM(pretrained=hf_engine.model, tokenizer=hf_engine.tokenizer, batch_size=1))
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-3
    assert ours_greedy == theirs_greedy
    hf_rolling = HFLM(pretrained=hf_engine.model, tokenizer=hf_engine.tokenizer, batch_size=1)
    assert _rolling(from_engine(hf_engine)) == pytest.approx(_rolling(hf_rolling), abs=1e-3)


def test_bnb4_backend_loads_our_folder_and_scores_like_hflm(smol_bnb4):
    import bitsandbytes as bnb
    from lm_eval.models.huggingface import HFLM
    from quantforge.evals.lm_backends import QFBnb4

    lm = QFBnb4(path=str(smol_bnb4))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in lm.engine.model.modules())
    requests = REQUESTS[:4] + REQUESTS[8:]
    ours, _ = _ll(lm, requests)
    # the model returns bf16 logits (bnb's compute dtype), and HFLM would take their log_softmax and sum in bf16
    # (sums near 42 nats round to 0.25); handed the same logits widened to float32 (exact), it must match our
    # float64 scores to float32 rounding
    hook = lm.engine.model.lm_head.register_forward_hook(lambda mod, args, out: out.float())
    theirs, _ = _ll(HFLM(pretrained=lm.engine.model, tokenizer=lm.engine.tokenizer, batch_size=1), requests)
    hook.remove()
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-3
    lm.close()


def test_generate_until_is_greedy_and_stops(hf_engine, f16_llamacpp):
    req = [Instance("generate_until", {}, ("The capital of France is", {"until": ["."], "max_gen_toks": 12}), 0)]
    texts = [from_engine(e).generate_until(req)[0] for e in (hf_engine, f16_llamacpp)]
    assert texts[0] == texts[1]
    assert "Paris" in texts[0] and "." not in texts[0]


def test_register_is_idempotent_and_names_our_classes():
    """Running a task through the registered names is ``test_cli_eval.py::test_lm_eval_cli_sees_our_backends``."""
    from lm_eval.api.registry import get_model
    from quantforge.evals import lm_backends

    lm_backends.register()
    lm_backends.register()
    assert get_model("qf-gguf") is lm_backends.QFGGUF
    assert get_model("qf-hf") is lm_backends.QFHF and get_model("qf-bnb4") is lm_backends.QFBnb4


@pytest.mark.slow
def test_gguf_engines_agree_on_q4_k_m_task_accuracy(smol_gguf, q4_llamacpp, data_dir):
    """The torch engine (our exact dequantization) and llama.cpp (which also rounds activations to 8 bits
    in its q4_K/q6_K dot products) must land within one standard error on the same 40 ARC-Easy questions."""
    from quantforge.evals.engines import load_gguf_torch
    from quantforge.evals.lm_eval_runner import run_tasks

    torch_engine = load_gguf_torch(smol_gguf("q4_k_m"))
    scores = {}
    for name, engine in (("llama.cpp", q4_llamacpp), ("torch", torch_engine)):
        scores[name] = run_tasks(from_engine(engine), ["arc_easy"], limit=TASK_LIMIT).metrics
    torch_engine.close()
    a, b = scores["llama.cpp"], scores["torch"]
    for metric in ("arc_easy_acc", "arc_easy_acc_norm"):
        se = max(a[metric + "_stderr"], b[metric + "_stderr"])
        assert 0 < se < 0.1, scores
        assert abs(a[metric] - b[metric]) <= se, scores
