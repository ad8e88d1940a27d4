"""``--base original`` against ``--base quantized`` after a Dolly fine-tune of SmolLM2-135M-Instruct (dithered).

The adapter was trained by ``quantforge train`` on the NF4 (double-quantized) base, Dolly records 1-4700
(``benchmarks/merge_device.sh``). Each merge is a ``quantforge merge ... --format gguf --type T --base B``; each
GGUF runs in llama-cpp-python. Scored on held-out Dolly records (4701 onwards, never trained on), on the response
tokens only, as the trainer scores them:

- held-out loss: mean negative log-likelihood of the response tokens;
- KL divergence from the 16-bit fine-tuned model, base + adapter through PEFT in float32 (the reference), at the
  positions that predict those tokens, and top-1 agreement with it.

Reference rows, same tokens: the reference itself, the base without the adapter, and the model exactly as trained
(NF4-dequantized base + adapter, float32: ``quantforge merge --format hf16 --dtype fp32 --base quantized``).

    .venv/bin/python -P benchmarks/merge_base.py --adapter DIR [--records 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import tempfile
import time
from pathlib import Path

DOLLY = "dolly/dolly_5k.jsonl"
TRAINED_RECORDS = 4700
TYPES = ("q8_0", "q4_k_m")
BASES = ("original", "quantized")


def emit(*parts: object, **kw: object) -> None:
    """The script's output (status lines and the table)."""
    print(*parts, **kw, flush=True)  # noqa: T201


def held_out(tok, n: int, max_len: int) -> list:
    """The first ``n`` usable held-out records (index >= TRAINED_RECORDS) as trainer examples of at most
    ``max_len`` tokens."""
    from quantforge.evals.data import data_file
    from quantforge.train.data import tokenize_record

    out = []
    with open(data_file(DOLLY), encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < TRAINED_RECORDS:
                continue
            ex = tokenize_record(tok, json.loads(line), "instruction")
            if ex is not None and len(ex) <= max_len:
                out.append(ex)
            if len(out) == n:
                break
    return out


class Scores:
    """Running sums over scored tokens: NLL, KL from the reference (and its square), top-1 agreement."""

    def __init__(self) -> None:
        self.n = 0
        self.nll = 0.0
        self.kl = 0.0
        self.kl2 = 0.0
        self.top1 = 0

    def add(self, logits, ref_logp, targets, rows) -> None:
        import torch

        logp = torch.log_softmax(logits[rows].double(), dim=-1)
        self.nll -= float(logp.gather(1, targets[:, None]).sum())
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        self.kl += float(kl.sum())
        self.kl2 += float((kl * kl).sum())
        self.top1 += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        self.n += len(rows)

    def row(self) -> tuple[float, float, float, float]:
        mean = self.kl / self.n
        err = math.sqrt(max(self.kl2 / self.n - mean * mean, 0.0) / max(self.n - 1, 1))
        return self.nll / self.n, mean, err, self.top1 / self.n


def llama_logits(llm, ids: list[int]):
    import numpy as np
    import torch

    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, type=Path)
    ap.add_argument("--records", type=int, default=32, help="held-out Dolly records scored")
    ap.add_argument("--max-len", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="folder for the merged files (default: a temp folder)")
    args = ap.parse_args()
    import torch
    from llama_cpp import Llama
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantforge import fixtures
    from quantforge.cli.main import main as qf

    torch.set_num_threads(args.threads)
    model = fixtures.smollm2("dithered")
    tok = AutoTokenizer.from_pretrained(model)
    examples = held_out(tok, args.records, args.max_len)
    work = args.work or Path(tempfile.mkdtemp(prefix="merge-base-"))
    t0 = time.perf_counter()
    ggufs = {}
    for base in BASES:
        for qtype in TYPES:
            out = work / f"merged-{base}-{qtype}.gguf"
            assert qf(["merge", str(model), str(args.adapter), "--format", "gguf", "--type", qtype, "--base", base,
                       "-o", str(out), "--force", "--quiet"]) == 0
            ggufs[(base, qtype)] = out
    trained = work / "trained-f32"
    assert qf(["merge", str(model), str(args.adapter), "--format", "hf16", "--dtype", "fp32", "--base", "quantized",
               "-o", str(trained), "--force", "--quiet"]) == 0
    emit(f"merged in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    base_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    reference = PeftModel.from_pretrained(base_model, str(args.adapter)).eval()
    as_trained = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32).eval()
    n_ctx = max(len(e) for e in examples)
    llms = {k: Llama(model_path=str(p), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=args.threads,
                     verbose=False) for k, p in ggufs.items()}
    scores = {k: Scores() for k in ["reference", "no adapter", "as trained (NF4 + adapter, f32)", *ggufs]}
    for i, ex in enumerate(examples):
        ids = torch.tensor([ex.ids])
        mask = torch.tensor(ex.loss_mask[1:], dtype=torch.bool)
        rows = torch.nonzero(mask).flatten()
        targets = torch.tensor(ex.ids[1:])[rows]
        with torch.no_grad():
            ref = reference(ids).logits[0, :-1].double()
            ref_logp = torch.log_softmax(ref[rows], dim=-1)
            scores["reference"].add(ref, ref_logp, targets, rows)
            with reference.disable_adapter():
                scores["no adapter"].add(reference(ids).logits[0, :-1], ref_logp, targets, rows)
            scores["as trained (NF4 + adapter, f32)"].add(as_trained(ids).logits[0, :-1], ref_logp, targets, rows)
        for k, llm in llms.items():
            scores[k].add(llama_logits(llm, ex.ids)[:-1], ref_logp, targets, rows)
        emit(f"record {i + 1}/{len(examples)}", file=sys.stderr)
    for llm in llms.values():
        llm.close()

    n_tok = scores["reference"].n
    ref_loss = scores["reference"].row()[0]
    emit(f"# --base original vs --base quantized, SmolLM2-135M-Instruct dithered + Dolly LoRA "
         f"({args.adapter.name}); {len(examples)} held-out Dolly records, {n_tok} response tokens; llama-cpp-python, "
         f"{args.threads} threads; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    emit("| model | held-out loss | loss - reference | KLD mean (± s.e.) | top-1 % |")
    emit("|---|---:|---:|---:|---:|")
    for k, s in scores.items():
        loss, kl, err, top1 = s.row()
        name = f"merge --base {k[0]} -> {k[1]} (llama.cpp)" if isinstance(k, tuple) else k
        emit(f"| {name} | {loss:.4f} | {loss - ref_loss:+.4f} | {kl:.5f} ± {err:.5f} | {100 * top1:.2f} |")
    for qtype in TYPES:
        o, q = scores[("original", qtype)].row(), scores[("quantized", qtype)].row()
        better = "original" if o[1] < q[1] else "quantized"
        emit(f"\n{qtype}: KLD original / quantized = {o[1] / q[1]:.2f}x; held-out loss original - quantized = "
             f"{o[0] - q[0]:+.4f} nats; lower KLD: --base {better}")


if __name__ == "__main__":
    main()
