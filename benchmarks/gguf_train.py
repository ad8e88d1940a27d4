"""Training on the GGUF layout against training on NF4 and re-quantizing, deployed in llama.cpp.

SmolLM2-135M-Instruct (dithered), Dolly instructions, the q4_k_m mix as a GGUF plan (``base_type: q4_k_m``), the
same steps, data, seed and hyper-parameters for every run, three seeds:

* (R) reference: LoRA trained on the 16-bit (bf16) base, deployed as the bf16 GGUF + the adapter as a LoRA GGUF;
* (A) LoRA trained on NF4 (double-quantized), merged into the 16-bit weights, quantized to the plan: one GGUF;
* (B) LoRA trained on the plan's GGUF layout itself (``--base-format gguf --plan``), deployed as the plan's GGUF
  (``quantforge quantize --plan``) + the adapter as a LoRA GGUF.

All three run in llama.cpp (llama-cpp-python, ``lora_path`` for R and B) on Dolly examples never trained on:
held-out loss on the response tokens, and KL divergence of (A) and (B) against (R) over the same tokens. Before
evaluating, (B)'s adapter record is checked against the plan's GGUF written on the CPU (every tensor's type and
SHA-256): the base llama.cpp runs is the base the adapter was trained on, bit for bit.

Two stages, as run for ``benchmarks/RESULTS.md``::

    # on the GPU machine (training; adapters come back as one tar per seed). -P: benchmarks/kernels.py must not
    # shadow Hugging Face's ``kernels`` package
    python -P benchmarks/gguf_train.py train --model /tmp/smol-dithered --data .bench/qlora/dolly_1500.jsonl \\
        --out $OUT --seeds 0 1 2
    # here, on the CPU (deployment artifacts + llama.cpp evaluation)
    python -P benchmarks/gguf_train.py eval --model "$(quantforge fixture smollm2 --variant dithered)" \\
        --adapters DIR_WITH_TARS --data ../shared/data/dolly/dolly_5k.jsonl --work /tmp/gguf-train
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tarfile
import time
from pathlib import Path

PLAN = "version: 1\ntarget: gguf\nbase_type: q4_k_m\n"
KINDS = {"B": "gguf", "A": "nf4", "R": "bf16"}
HELD_OUT_FROM = 4800
"""Dolly rows from here on are the held-out set (training reads the first 1,500 rows only)."""


def log(msg: str) -> None:
    print(msg, flush=True)  # noqa: T201 (the benchmark prints its table)


def checkpoint_digest(model: str | Path) -> str:
    """SHA-256 over a checkpoint's tensors (sorted names, raw bytes): the same model on both machines."""
    import hashlib

    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in sorted(st.keys()):
                t = st.get_tensor(name).contiguous()
                h.update(name.encode())
                h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _train_examples(data: Path, tok, max_seq_len: int) -> list:
    """Dolly records tokenized as the trainer does (chat template, response-only loss), without ``datasets`` (the
    GPU machine lacks it)."""
    from quantforge.train.data import detect_shape, tokenize_record

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    shape = detect_shape(list(rows[0]))
    out = [tokenize_record(tok, r, shape) for r in rows]
    return [e for e in out if e is not None and len(e) <= max_seq_len]


def train_stage(args: argparse.Namespace) -> int:
    import torch
    from quantforge.train import TrainConfig, load_model, load_tokenizer
    from quantforge.train.adapter import save_adapter
    from quantforge.train.loop import Trainer

    from quantforge.plan import Plan

    out = Path(args.out)
    plan = out / "plan.yaml"
    plan.write_text(PLAN)
    tok = load_tokenizer(args.model)
    examples = _train_examples(Path(args.data), tok, args.max_seq_len)
    digest = checkpoint_digest(args.model)
    log(f"checkpoint {args.model}: tensors sha256 {digest}")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    log(f"device: {dev}, torch {torch.__version__}; {len(examples)} training examples, {args.steps} steps of "
        f"{args.batch_tokens} tokens, rank {args.rank}, lr {args.lr}")
    rows = []
    for seed in args.seeds:
        folders = []
        for kind, base in KINDS.items():
            cfg = TrainConfig(rank=args.rank, alpha=2.0 * args.rank, lr=args.lr, max_steps=args.steps,
                              batch_tokens=args.batch_tokens, max_seq_len=args.max_seq_len, eval_split=0.0,
                              seed=seed, warmup=0.05, optimizer="adamw")
            t0 = time.perf_counter()
            if base == "gguf":
                model = load_model(args.model, lora=cfg.lora_spec(), base_format="gguf",
                                   plan=Plan(target="gguf", base_type="q4_k_m"), seed=seed)
            else:
                model = load_model(args.model, lora=cfg.lora_spec(), base_format=None if base == "bf16" else base,
                                   seed=seed)
            load_s = time.perf_counter() - t0
            torch.manual_seed(seed)
            model.train()
            tr = Trainer(model, examples, [], cfg)
            steps = [tr.step(i) for i in range(cfg.max_steps)]
            wall = time.perf_counter() - t0
            folder = Path(args.workdir) / f"{kind}-s{seed}"
            save_adapter(model, folder, {"train_config": cfg.to_dict(), "steps": cfg.max_steps,
                                         "losses": [r["loss"] for r in steps], "checkpoint_sha256": digest,
                                         "device": dev})
            tps = statistics.median(r["tokens_per_s"] for r in steps[1:] or steps)
            peak = max((r["peak_gib"] or 0.0) for r in steps)
            rows.append((kind, seed, load_s, wall, tps, peak, steps[0]["loss"], steps[-1]["loss"]))
            log(f"{kind} seed {seed}: load {load_s:.1f}s, load+train {wall:.1f}s, {tps:,.0f} tok/s, peak {peak:.2f} "
                f"GiB, loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}")
            folders.append(folder)
            del model, tr
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        with tarfile.open(out / f"adapters-s{seed}.tar", "w") as tar:
            for f in folders:
                for name in ("adapter_config.json", "adapter_model.safetensors", "quantforge_adapter.json"):
                    tar.add(f / name, arcname=f"{f.name}/{name}")
    log("\n| run | seed | load s | load+train s | tokens/s (median step) | peak GiB | first loss | last loss |")
    log("|---|---|---|---|---|---|---|---|")
    for kind, seed, load_s, wall, tps, peak, first, last in rows:
        log(f"| {kind} | {seed} | {load_s:.1f} | {wall:.1f} | {tps:,.0f} | {peak:.2f} | {first:.4f} | {last:.4f} |")
    return 0


def _held_out(data: Path, model: str, max_seq_len: int, n: int) -> list:
    from quantforge.train import build_examples, load_tokenizer

    lines = data.read_text().splitlines()[HELD_OUT_FROM:]
    records = [json.loads(x) for x in lines]
    import datasets

    examples, _ = build_examples(datasets.Dataset.from_list(records), load_tokenizer(model), max_seq_len)
    return examples[:n]


def _run(cmd: list[str]) -> None:
    from quantforge.cli.main import main

    t0 = time.perf_counter()
    rc = main(cmd)
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): quantforge {' '.join(cmd)}")
    log(f"  quantforge {' '.join(cmd[:2])} ... {time.perf_counter() - t0:.1f}s")


def _llama(path: Path, lora: Path | None, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), lora_path=None if lora is None else str(lora), n_ctx=n_ctx, logits_all=True,
                 verbose=False, n_threads=2, n_batch=n_ctx)


def _log_probs(llm, ids: list[int]):
    import numpy as np
    import torch

    llm.reset()
    llm.eval(ids)
    return torch.log_softmax(torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float64), -1)


def eval_stage(args: argparse.Namespace) -> int:
    import torch
    from quantforge.train.gguf_base import check_base_gguf

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    plan = work / "plan.yaml"
    plan.write_text(PLAN)
    model = str(args.model)
    for tar in sorted(Path(args.adapters).glob("adapters-s*.tar")):
        with tarfile.open(tar) as t:
            t.extractall(work / "adapters", filter="data")
    bf16, base = work / "base-bf16.gguf", work / "base-plan.gguf"
    if not bf16.exists():
        _run(["quantize", model, "--type", "bf16", "-o", str(bf16)])
    if not base.exists():
        _run(["quantize", model, "--plan", str(plan), "-o", str(base)])
    digest = checkpoint_digest(model)
    examples = _held_out(Path(args.data), model, args.max_seq_len, args.examples)
    n_ctx = max(len(e) for e in examples)
    log(f"held-out: {len(examples)} Dolly examples (rows {HELD_OUT_FROM}+), {sum(e.n_targets for e in examples)} "
        "response tokens")
    results = []
    for seed in args.seeds:
        ad = {k: work / "adapters" / f"{k}-s{seed}" for k in KINDS}
        info = json.loads((ad["B"] / "quantforge_adapter.json").read_text())
        if info.get("checkpoint_sha256", digest) != digest:
            raise SystemExit(f"seed {seed}: the adapters were trained on another checkpoint than {model}")
        bad = check_base_gguf(info["layout"], base)
        log(f"seed {seed}: (B) trained on the plan GGUF's bytes: {'yes' if not bad else f'NO, differs in {bad[:3]}'}")
        files = {}
        for k in ("R", "B"):
            files[k] = work / f"lora-{k}-s{seed}.gguf"
            if not files[k].exists():
                _run(["export", model, str(ad[k]), "--to", "lora-gguf", "-o", str(files[k])])
        merged = work / f"merged-A-s{seed}.gguf"
        if not merged.exists():
            _run(["merge", model, str(ad["A"]), "--plan", str(plan), "-o", str(merged)])
        llms = {"R": _llama(bf16, files["R"], n_ctx), "A": _llama(merged, None, n_ctx),
                "B": _llama(base, files["B"], n_ctx)}
        nll = {k: 0.0 for k in llms}
        kld = {"A": 0.0, "B": 0.0}
        count = 0
        t0 = time.perf_counter()
        for ex in examples:
            labels = torch.tensor(ex.labels())
            pos = labels != -100
            tgt = labels[pos]
            lps = {k: _log_probs(llm, ex.ids)[pos] for k, llm in llms.items()}
            for k, lp in lps.items():
                nll[k] -= float(lp.gather(1, tgt[:, None]).sum())
            ref = lps["R"]
            for k in kld:
                kld[k] += float((ref.exp() * (ref - lps[k])).sum())
            count += int(pos.sum())
        for llm in llms.values():
            llm.close()
        row = {"seed": seed, "tokens": count, "bit_exact_base": not bad, "seconds": time.perf_counter() - t0,
               **{f"loss_{k}": v / count for k, v in nll.items()}, **{f"kld_{k}": v / count for k, v in kld.items()}}
        results.append(row)
        log(json.dumps(row))
    _table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _table(results: list[dict]) -> None:
    log("\n| seed | held-out loss R (16-bit) | loss A (NF4 -> merged -> plan) | loss B (plan GGUF + LoRA) | "
        "KLD A vs R | KLD B vs R | KLD ratio A/B |")
    log("|---|---|---|---|---|---|---|")
    for r in results:
        log(f"| {r['seed']} | {r['loss_R']:.4f} | {r['loss_A']:.4f} | {r['loss_B']:.4f} | {r['kld_A']:.5f} | "
            f"{r['kld_B']:.5f} | {r['kld_A'] / r['kld_B']:.2f} |")

    def stat(key: str) -> str:
        vals = [r[key] for r in results]
        spread = (max(vals) - min(vals)) / 2 if len(vals) > 1 else math.nan
        return f"{statistics.mean(vals):.5f} ± {spread:.5f}"

    log(f"| mean ± half-range | {stat('loss_R')} | {stat('loss_A')} | {stat('loss_B')} | {stat('kld_A')} | "
        f"{stat('kld_B')} | |")
    diff_loss = [r["loss_A"] - r["loss_B"] for r in results]
    diff_kld = [r["kld_A"] - r["kld_B"] for r in results]
    log(f"\nper-seed loss A - B: {', '.join(f'{d:+.5f}' for d in diff_loss)}; "
        f"KLD A - B: {', '.join(f'{d:+.5f}' for d in diff_kld)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="stage", required=True)
    t = sub.add_parser("train", help="train R, A and B per seed (GPU when present)")
    t.add_argument("--model", required=True, help="SmolLM2 dithered checkpoint folder")
    t.add_argument("--data", required=True, help="training records (Dolly JSONL)")
    t.add_argument("--out", required=True, help="folder for plan.yaml and adapters-s<seed>.tar")
    t.add_argument("--workdir", default="/tmp/gguf-train")
    e = sub.add_parser("eval", help="build the deployed artifacts and score them in llama.cpp")
    e.add_argument("--model", required=True)
    e.add_argument("--adapters", required=True, help="folder holding adapters-s<seed>.tar")
    e.add_argument("--data", required=True, help="dolly_5k.jsonl (rows from 4800 on are held out)")
    e.add_argument("--work", default="/tmp/gguf-train-eval")
    e.add_argument("--examples", type=int, default=60)
    e.add_argument("--json", default=None)
    for p in (t, e):
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        p.add_argument("--rank", type=int, default=4)
        p.add_argument("--lr", type=float, default=5e-4)
        p.add_argument("--steps", type=int, default=60)
        p.add_argument("--batch-tokens", type=int, default=8192)
        p.add_argument("--max-seq-len", type=int, default=1024)
    args = ap.parse_args()
    return train_stage(args) if args.stage == "train" else eval_stage(args)


if __name__ == "__main__":
    sys.exit(main())
