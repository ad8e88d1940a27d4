"""Evaluation table for SmolLM2-135M-Instruct, plus a cross-check against ``llama-perplexity``.

For each fixture variant (plain, dithered; see shared/reference/FIXTURES.md):

1. Table: the bf16 reference, our bnb4 nf4 folder and our GGUF exports (q8_0, q6_k, q4_k_m, q3_k_m, q2_k), each
   scored by ``quantforge.evals.runner.evaluate`` (GGUFs on the llama.cpp engine): size, bpw, PPL, KLD (mean,
   median, p99; exact float32 reference), top-1 and two tasks' accuracy.
2. Cross-check: llama.cpp-made files (``llama-quantize`` of our f16 GGUF, the same five types) scored by us
   (llama.cpp engine, reference = the f16 GGUF through llama.cpp's 16-bit log-prob storage, ``--llamacpp-base``)
   and by ``llama-perplexity --kl-divergence`` on the same text, n_ctx and chunks. Goal: mean KLD and PPL within 1%.

Binaries: ``.bench/llama-build/bin/llama-perplexity`` and ``llama-quantize`` (built beforehand). Artifacts are
written afresh to ``.bench/eval/<variant>/`` on every run. Variants run in parallel processes (``--jobs``), each
with ``--threads`` torch / llama.cpp threads.

    python benchmarks/eval_table.py --chunks 16 --cross-chunks 8 --limit 100 --threads 1 --jobs 2 --record
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH, LLAMA_BIN, record  # noqa: E402

GGUF_TYPES = ("q8_0", "q6_k", "q4_k_m", "q3_k_m", "q2_k")
LLAMA_FTYPES = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q4_k_m": "Q4_K_M", "q3_k_m": "Q3_K_M", "q2_k": "Q2_K"}
SECTION = "Evaluation table"
DEVICE = "AMD EPYC, 2 cores (no GPU)"
BOUND = 0.01


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # noqa: T201


def llama_tools() -> dict[str, Path]:
    bins = {name: LLAMA_BIN / name for name in ("llama-perplexity", "llama-quantize")}
    missing = [str(p) for p in bins.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"missing llama.cpp binaries: {', '.join(missing)} (build llama.cpp into .bench/llama-build)")
    return bins


def _tool_env() -> dict[str, str]:
    return {**os.environ, "LD_LIBRARY_PATH": f"{LLAMA_BIN}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


def make_artifacts(ref: Path, out: Path, variant: str) -> tuple[list[Path], Path]:
    """Our exports, written afresh: the nf4 bnb4 folder, one GGUF per type, and the f16 GGUF."""
    from quantforge.exporters.bnb4 import export_bnb4
    from quantforge.exporters.gguf import export_gguf

    out.mkdir(parents=True, exist_ok=True)
    nf4 = out / f"smollm2-{variant}-nf4"
    log(f"[{variant}] export {nf4.name}")
    export_bnb4(ref, nf4, quant_type="nf4", device="cpu", force=True)
    paths = [nf4]
    for t in GGUF_TYPES:
        p = out / f"smollm2-{variant}-{t}.gguf"
        log(f"[{variant}] export {p.name}")
        export_gguf(ref, p, qtype=t, force=True)
        paths.append(p)
    f16 = out / f"smollm2-{variant}-f16.gguf"
    export_gguf(ref, f16, qtype="f16", force=True)
    return paths, f16


def parse_llama_perplexity(text: str) -> dict[str, float]:
    """Mean PPL(Q), Mean PPL(base), mean / median / p99 KLD and Same top p from llama-perplexity's summary."""
    pats = {
        "ppl": r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", "ppl_base": r"Mean PPL\(base\)\s*:\s*([0-9.]+)",
        "kld_mean": r"Mean\s+KLD:\s*([-0-9.]+)", "kld_median": r"Median\s+KLD:\s*([-0-9.]+)",
        "kld_p99": r"99\.0%\s+KLD:\s*([-0-9.]+)", "top1": r"Same top p:\s*([0-9.]+)",
    }
    out = {}
    for key, pat in pats.items():
        m = re.search(pat, text)
        if m is None:
            raise RuntimeError(f"llama-perplexity output has no {key!r} line:\n{text[-2000:]}")
        out[key] = float(m.group(1)) / (100.0 if key == "top1" else 1.0)
    return out


def cross_check(variant: str, f16: Path, text: Path, n_ctx: int, chunks: int, threads: int, out: Path) -> list[dict]:
    """llama.cpp-made quants scored by llama-perplexity and by us on the same tokens."""
    from quantforge.evals.runner import EvalSettings, evaluate

    tools = llama_tools()
    made = []
    for t in GGUF_TYPES:
        p = out / f"llamacpp-{variant}-{t}.gguf"
        log(f"[{variant}] llama-quantize {t}")
        subprocess.run([str(tools["llama-quantize"]), str(f16), str(p), LLAMA_FTYPES[t], str(threads)],
                       check=True, capture_output=True, env=_tool_env())
        made.append(p)
    base_file = out / f"kld-base-{n_ctx}-{chunks}.bin"
    base_file.unlink(missing_ok=True)
    common = ["-f", str(text), "-c", str(n_ctx), "--chunks", str(chunks), "-t", str(threads), "-b", str(n_ctx)]
    log(f"[{variant}] llama-perplexity base run")
    subprocess.run([str(tools["llama-perplexity"]), "-m", str(f16), "--kl-divergence-base", str(base_file),
                    *common], check=True, capture_output=True, env=_tool_env())
    theirs = {}
    for p in made:
        log(f"[{variant}] llama-perplexity --kl-divergence {p.name}")
        proc = subprocess.run([str(tools["llama-perplexity"]), "-m", str(p), "--kl-divergence-base", str(base_file),
                               "--kl-divergence", *common], check=True, capture_output=True, text=True,
                              env=_tool_env())
        theirs[p.name] = parse_llama_perplexity(proc.stdout + proc.stderr)
    settings = EvalSettings(n_ctx=n_ctx, n_chunks=chunks, text=str(text), n_threads=threads, engine="llama.cpp",
                            llamacpp_base=True)
    ours = evaluate(made, f16, settings, log=lambda m: log(f"[{variant}] {m}"))
    return [{"name": a["name"], "ours": a["metrics"], "theirs": theirs[a["name"]]} for a in ours["artifacts"]]


def cross_rows(rows: list[dict]) -> list[str]:
    lines = ["| llama.cpp-made file | KLD ours | KLD llama-perplexity | ratio | PPL ours | PPL llama-perplexity "
             "| ratio | top-1 ours % | top-1 llama-perplexity % | KLD median ours / theirs | KLD p99 ours / theirs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        o, t = r["ours"], r["theirs"]
        lines.append(f"| {r['name']} | {o['kld_mean']:.6f} | {t['kld_mean']:.6f} | {o['kld_mean'] / t['kld_mean']:.4f} "
                     f"| {o['ppl']:.4f} | {t['ppl']:.4f} | {o['ppl'] / t['ppl']:.5f} | {100 * o['top1']:.3f} "
                     f"| {100 * t['top1']:.3f} | {o['kld_median']:.6f} / {t['kld_median']:.6f} "
                     f"| {o['kld_p99']:.5f} / {t['kld_p99']:.5f} |")
    return lines


def run_variant(variant: str, args: argparse.Namespace) -> list[str]:
    """Table and cross-check of one fixture variant, as markdown lines (runs in its own process)."""
    import torch

    torch.set_num_threads(args.threads)
    from quantforge.evals import data, report
    from quantforge.evals.runner import EvalSettings, evaluate

    from quantforge import fixtures

    t0 = time.time()
    ref = fixtures.smollm2(variant)
    out = BENCH / "eval" / variant
    artifacts, f16 = make_artifacts(ref, out, variant)
    settings = EvalSettings(tasks=[t for t in args.tasks.split(",") if t], limit=args.limit, n_ctx=args.ctx,
                            n_chunks=args.chunks, n_threads=args.threads)
    results = evaluate(artifacts, ref, settings, log=lambda m: log(f"[{variant}] {m}"))
    report.write(results, out / "results.json", force=True)
    body = [f"#### SmolLM2-135M-Instruct, {variant} fixture", "",
            *report.markdown_table(results).rstrip().splitlines(), ""]
    t1 = time.time()
    if not args.skip_cross_check:
        rows = cross_check(variant, f16, data.wikitext2_test(), args.ctx, args.cross_chunks, args.threads, out)
        worst = max(max(abs(r["ours"]["kld_mean"] / r["theirs"]["kld_mean"] - 1),
                        abs(r["ours"]["ppl"] / r["theirs"]["ppl"] - 1)) for r in rows)
        body += [f"Cross-check against `llama-perplexity --kl-divergence` ({variant}; files made by llama-quantize "
                 f"from our f16 GGUF; n_ctx {args.ctx}, first {args.cross_chunks} chunks of wiki.test.raw; reference: "
                 "the f16 GGUF on llama.cpp, log-probs through llama.cpp's 16-bit storage on both sides):", "",
                 *cross_rows(rows), "",
                 f"Largest |ratio - 1| of mean KLD and PPL: {100 * worst:.4f}% (bound {100 * BOUND:.0f}%: "
                 f"{'met' if worst <= BOUND else 'NOT met'}).", ""]
    body.append(f"Wall time ({variant}): table {(t1 - t0) / 60:.1f} min, cross-check {(time.time() - t1) / 60:.1f} "
                f"min, {args.threads} thread(s).")
    body.append("")
    return body


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="plain,dithered")
    ap.add_argument("--chunks", type=int, default=16, help="512-token chunks of wiki.test.raw")
    ap.add_argument("--cross-chunks", type=int, default=8, help="chunks of the llama-perplexity cross-check")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--tasks", default="arc_easy,piqa")
    ap.add_argument("--limit", type=int, default=100, help="documents per task")
    ap.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads per variant process")
    ap.add_argument("--jobs", type=int, default=2, help="variants evaluated at the same time")
    ap.add_argument("--skip-cross-check", action="store_true")
    ap.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(args.jobs, len(variants))) as pool:
        bodies = pool.starmap(run_variant, [(v, args) for v in variants])
    command = ("python benchmarks/eval_table.py " + " ".join(sys.argv[1:])).strip()
    lines = [f"Settings: PPL/KLD on the first {args.chunks} x {args.ctx} tokens of WikiText-2 `wiki.test.raw` "
             f"(llama-perplexity's chunking: second half of each chunk scored, {args.chunks * (args.ctx // 2 - 1)} "
             f"tokens); KLD against the bf16 checkpoint run in float32 (exact log-probs); tasks "
             f"{args.tasks.replace(',', ', ')} (offline lm-eval tasks, 0-shot), first {args.limit} documents each, "
             "accuracies ± lm-eval's standard error; GGUFs on the llama.cpp engine (flash attention on, as in "
             "llama.cpp's tools); nf4 on transformers + bitsandbytes (CPU).", ""]
    for body in bodies:
        lines += body
    lines.append(f"Total wall time: {(time.time() - t0) / 60:.1f} min ({len(variants)} variant(s), "
                 f"{min(args.jobs, len(variants))} in parallel).")
    text = "\n".join(lines)
    print(text)  # noqa: T201
    if args.record:
        record(SECTION, command, DEVICE, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
