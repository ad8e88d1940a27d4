"""Planner quality: our dynamic GGUF plans vs llama.cpp's mixes at the same file size, and a Dynamic
4-bit bnb plan vs uniform NF4, on the dithered SmolLM2.

    python benchmarks/planner_quality.py [--record] [--work DIR] [--apply ours|llama] [--eval-chunks 8]

Steps (all on this machine's CPU):

1. our f16 GGUF of the model (the base for llama.cpp's tools and the KLD reference);
2. our calibration (``quantforge calibrate``: wiki.valid.raw + c4_demo.jsonl) -> imatrix.gguf + sensitivity.json;
3. llama.cpp's imatrix from the *same* calibration text (the decoded calibration chunks, same chunk count and
   size), then llama.cpp's mixes (``llama-quantize --imatrix``) from the f16 GGUF;
4. our plan at each mix's tensor-data size (``quantforge plan --size-mb``), applied by our exporter with our
   imatrix (``--apply ours``, the product path) or by ``llama-quantize --tensor-type`` per tensor with our
   imatrix (``--apply llama``, isolating the plan from the codecs);
5. mean KLD of every file against the f16 base with ``llama-perplexity --kl-divergence`` (512-token chunks of
   wiki.test.raw, second-half scoring, llama.cpp's conventions) — the same tool for both sides;
6. bnb4: uniform NF4 vs our Dynamic 4-bit plan (``--max-overhead 0.10``), simulated by NF4 quantize-dequantize of
   the HF model's linear weights in torch, KLD against the bf16 model on the same evaluation chunks, same scoring.

Needs ``llama-imatrix``, ``llama-quantize`` and ``llama-perplexity`` in .bench/llama-build/bin (or $LLAMA_CPP_BIN).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH, LLAMA_BIN, device_line, record, table  # noqa: E402

MIXES = ("q2_k", "q3_k_m", "q4_k_m")
CURVE_MIXES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k")
APPLIED = {"ours": "our exporter (our codecs + our imatrix)",
           "llama": "llama-quantize --tensor-type (llama.cpp codecs + our imatrix)"}
FTYPES = {"q2_k": "Q2_K", "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L", "q4_k_s": "Q4_K_S",
          "q4_k_m": "Q4_K_M", "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}


def data_dir() -> Path:
    env = os.environ.get("QUANTFORGE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def quality_subject(work: str) -> tuple[Path, Path, list[Path]]:
    """What the quality benchmarks share: the scratch folder (made if missing), the dithered SmolLM2 fixture and
    the calibration texts (WikiText-2's validation split and the C4 sample)."""
    from quantforge import fixtures

    folder = Path(work)
    folder.mkdir(parents=True, exist_ok=True)
    d = data_dir()
    texts = [d / "wikitext-2" / "wiki.valid.raw", d / "calibration" / "c4_demo.jsonl"]
    return folder, fixtures.smollm2("dithered"), texts


def tool(name: str) -> str:
    folder = Path(os.environ.get("LLAMA_CPP_BIN", LLAMA_BIN))
    path = folder / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: build llama.cpp's tools first")
    return str(path)


def run(cmd: list[str], log: Path) -> str:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    print(f"  {Path(cmd[0]).name} {time.perf_counter() - t0:.0f}s", flush=True)
    return proc.stdout + proc.stderr


def tensor_bytes(path: Path) -> tuple[int, dict[str, str]]:
    import gguf

    r = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in r.tensors), {t.name: t.tensor_type.name.lower() for t in r.tensors}


def kld_of(path: Path, base_logits: Path, work: Path, threads: int) -> dict[str, float]:
    """llama-perplexity's KLD statistics of ``path`` (cached in ``work`` by file name, size and mtime)."""
    cache_file = work / "kld-cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    st = path.stat()
    entry = f"{path.name}:{st.st_size}:{st.st_mtime_ns}:{base_logits.stat().st_mtime_ns}"
    if entry in cache:
        return cache[entry]
    out = run([tool("llama-perplexity"), "-m", str(path), "--kl-divergence-base", str(base_logits),
               "--kl-divergence", "-t", str(threads), "-c", "512"], work / f"{path.stem}.kld.log")
    stats = {}
    for key, pat in (("kld", r"Mean\s+KLD:\s+([0-9.eE+-]+)"), ("ppl", r"Mean\s+PPL\(Q\)\s*:\s+([0-9.eE+-]+)"),
                     ("same_top", r"Same top p:\s+([0-9.eE+-]+)")):
        m = re.search(pat, out)
        stats[key] = float(m.group(1)) if m else float("nan")
    cache[entry] = stats
    cache_file.write_text(json.dumps(cache, indent=1))
    return stats


def calibration_text(model: Path, data: list[Path], tokens: int, ctx: int, holdout: int, out: Path) -> int:
    """The decoded calibration chunks our calibrate uses, one file for llama-imatrix; returns the chunk count."""
    from quantforge.calibration.data import load_chunks
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    chunks = load_chunks(data, tok, tokens, ctx, holdout).calibration
    out.write_text("".join(tok.decode(c) for c in chunks), encoding="utf-8")
    return len(chunks)


def plan_body(path: Path) -> str:
    """A plan's text without its file paths (the cache key of the GGUF made from it)."""
    lines = path.read_text().splitlines()
    return "\n".join(ln for ln in lines if not ln.startswith(("calibration:", "notes:", "  -o")))


def apply_plan_llama(f16: Path, plan_path: Path, imatrix: Path, out: Path, work: Path, threads: int) -> None:
    """Our plan's per-tensor types through llama-quantize (``--tensor-type NAME=TYPE`` for every tensor)."""
    from quantforge.plan import load_plan

    plan = load_plan(plan_path)
    args = []
    for name, choice in plan.tensors.items():
        args += ["--tensor-type", f"^{re.escape(name)}$={choice.type}"]
    run([tool("llama-quantize"), "--imatrix", str(imatrix), *args, str(f16), str(out), "Q8_0", str(threads)],
        work / f"{out.stem}.quantize.log")


def bnb_eval(model: Path, plan_path: Path, chunks: list[list[int]]) -> dict[str, dict[str, float]]:
    """Mean KLD (second-half scoring) of uniform NF4 and of the plan's Dynamic 4-bit model vs the bf16 model."""
    import torch
    from quantforge.calibration.candidates import nf4_round_trip
    from transformers import AutoModelForCausalLM

    from quantforge.plan import load_plan

    skip = set(load_plan(plan_path).skip_modules)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.tensor(chunks)
    half = ids.shape[1] // 2

    def logprobs() -> list[Any]:
        with torch.no_grad():
            return [torch.log_softmax(m(ids[i:i + 1]).logits[0, half:-1].float(), -1) for i in range(len(ids))]

    base = logprobs()
    linears = {n: mod for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"}
    original = {n: mod.weight.data.clone() for n, mod in linears.items()}
    out = {}
    for label, skipped in (("uniform nf4", set()), ("dynamic", skip)):
        for n, mod in linears.items():
            mod.weight.data = original[n] if n in skipped else nf4_round_trip(original[n])
        lq = logprobs()
        kl = torch.cat([(p.exp() * (p - q)).sum(-1) for p, q in zip(base, lq, strict=True)])
        top = torch.cat([(p.argmax(-1) == q.argmax(-1)).float() for p, q in zip(base, lq, strict=True)])
        out[label] = {"kld": float(kl.mean()), "same_top": 100.0 * float(top.mean())}
    return out


def bnb_checkpoint_sizes(model: Path, plan_path: Path, work: Path) -> dict[str, int]:
    """Safetensors bytes of the uniform and the planned bnb4 checkpoints written by our exporter (empty when the
    exporter is not available)."""
    try:
        from quantforge.exporters.bnb4 import export_bnb4
    except ImportError:
        return {}
    sizes = {}
    for label, plan in (("uniform", None), ("dynamic", plan_path)):
        out = work / f"bnb4-{label}"
        export_bnb4(model, out, plan=plan, force=True)
        sizes[label] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return sizes


def plot_curve(points: dict[str, list[tuple[float, float, str]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, pts in points.items():
        merged: dict[tuple[float, float], list[str]] = {}
        for x, y, name in pts:
            merged.setdefault((round(x, 2), y), []).append(name)
        xy = sorted(merged)
        ax.plot([p[0] for p in xy], [p[1] for p in xy], "o-", label=label)
        for (x, y), names in merged.items():
            ax.annotate(" = ".join(names), (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KLD vs f16 (wiki.test, llama-perplexity)")
    ax.set_title("SmolLM2-135M dithered: quality vs size", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(BENCH / "planner"), help="scratch folder (cached between runs)")
    ap.add_argument("--apply", choices=("ours", "llama"), default="ours")
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--holdout-tokens", type=int, default=512)
    ap.add_argument("--proxy-rows", type=int, default=256)
    ap.add_argument("--measure", default="sample")
    ap.add_argument("--sample-layers", type=int, default=4)
    ap.add_argument("--fisher-draws", type=int, default=4)
    ap.add_argument("--curve", action="store_true", help="also the other mixes for the quality-vs-size curve")
    ap.add_argument("--extra-mb", default="72,78", help="with --curve: our plans at these tensor sizes too (MB)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    ap.add_argument("--note", default="", help="a sentence appended to the recorded notes")
    args = ap.parse_args()

    from quantforge.calibration.pipeline import CalibrationSettings, calibrate
    from quantforge.exporters.gguf import export_gguf

    from quantforge.cli.main import main as qf

    t_start = time.perf_counter()
    work, model, data = quality_subject(args.work)
    d = data_dir()
    ctx = 512
    timings: dict[str, float] = {}

    f16 = work / "f16.gguf"
    if not f16.is_file():
        export_gguf(model, f16, qtype="f16")
    eval_text = work / "eval.txt"
    eval_text.write_text((d / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8"))
    base_logits = work / "f16.kld-base.bin"
    if not base_logits.is_file():
        run([tool("llama-perplexity"), "-m", str(f16), "-f", str(eval_text), "--chunks", str(args.eval_chunks),
             "-c", str(ctx), "-t", str(args.threads), "--kl-divergence-base", str(base_logits)],
            work / "f16.base.log")

    print("calibrating (ours)", flush=True)
    t0 = time.perf_counter()
    settings = CalibrationSettings(tokens=args.tokens, ctx=ctx, holdout_tokens=args.holdout_tokens,
                                   measure=args.measure, proxy_rows=args.proxy_rows,
                                   sample_layers=args.sample_layers, fisher_draws=args.fisher_draws)
    cal = calibrate(model, data, work / "cal", settings)
    timings["calibrate"] = time.perf_counter() - t0
    sens = json.loads((work / "cal" / "sensitivity.json").read_text())

    calib_txt = work / "calib.txt"
    n_chunks = calibration_text(model, data, args.tokens, ctx, args.holdout_tokens, calib_txt)
    llama_imatrix = work / "llama-imatrix.gguf"
    if not llama_imatrix.is_file():
        run([tool("llama-imatrix"), "-m", str(f16), "-f", str(calib_txt), "-o", str(llama_imatrix), "-c", str(ctx),
             "--chunks", str(n_chunks), "-t", str(args.threads), "--no-ppl"], work / "llama-imatrix.log")

    mixes = CURVE_MIXES if args.curve else MIXES
    rows, points = [], {"llama.cpp mix + llama imatrix": [], "quantforge dynamic plan": []}
    results: dict[str, Any] = {}
    for mix in mixes:
        print(f"{mix}", flush=True)
        ref = work / f"llama-{mix}.gguf"
        if not ref.is_file():
            run([tool("llama-quantize"), "--imatrix", str(llama_imatrix), str(f16), str(ref), FTYPES[mix],
                 str(args.threads)], work / f"llama-{mix}.quantize.log")
        ref_bytes, _ = tensor_bytes(ref)
        plan_path = work / f"plan-{mix}.yaml"
        rc = qf(["plan", str(model), "--calibration", str(work / "cal"), "--size-mb", f"{ref_bytes / 1e6:.6f}",
                 "-o", str(plan_path), "--force"])
        if rc != 0:
            raise RuntimeError(f"quantforge plan failed for {mix}")
        digest = hashlib.sha256(plan_body(plan_path).encode()).hexdigest()[:10]
        ours = work / f"ours-{mix}-{args.apply}-{digest}.gguf"
        t0 = time.perf_counter()
        if ours.is_file():
            pass
        elif args.apply == "ours":
            export_gguf(model, ours, plan=plan_path, imatrix=work / "cal" / "imatrix.gguf")
        else:
            apply_plan_llama(f16, plan_path, work / "cal" / "imatrix.gguf", ours, work, args.threads)
        timings[f"apply {mix}"] = time.perf_counter() - t0
        our_bytes, our_types = tensor_bytes(ours)
        from quantforge.plan import load_plan

        plan = load_plan(plan_path)
        mismatched = [n for n, c in plan.tensors.items() if our_types.get(n) != c.type]
        k_ref = kld_of(ref, base_logits, work, args.threads)
        k_ours = kld_of(ours, base_logits, work, args.threads)
        size_ref, size_ours = ref.stat().st_size, ours.stat().st_size
        gain = 1.0 - k_ours["kld"] / k_ref["kld"]
        results[mix] = {"llama": {**k_ref, "file_bytes": size_ref, "tensor_bytes": ref_bytes},
                        "ours": {**k_ours, "file_bytes": size_ours, "tensor_bytes": our_bytes,
                                 "predicted_kld_sum": plan.predicted["kld_sum"], "type_mismatches": len(mismatched)},
                        "kld_reduction": gain}
        points["llama.cpp mix + llama imatrix"].append((size_ref / 1e6, k_ref["kld"], mix))
        points["quantforge dynamic plan"].append((size_ours / 1e6, k_ours["kld"], mix))
        rows.append([mix, f"{size_ref / 1e6:.2f}", f"{size_ours / 1e6:.2f}", f"{size_ours / size_ref - 1:+.2%}",
                     f"{k_ref['kld']:.5f}", f"{k_ours['kld']:.5f}", f"{gain:.1%}",
                     f"{k_ref['same_top']:.2f} / {k_ours['same_top']:.2f}", "yes" if gain >= 0.2 else "no"])
        print(f"  llama {k_ref['kld']:.5f}  ours {k_ours['kld']:.5f}  ({gain:+.1%})", flush=True)

    extra = [float(x) for x in args.extra_mb.split(",") if x.strip()] if args.curve else []
    for mb in extra:
        plan_path = work / f"plan-{mb:g}mb.yaml"
        if qf(["plan", str(model), "--calibration", str(work / "cal"), "--size-mb", f"{mb}", "-o", str(plan_path),
               "--force"]) != 0:
            raise RuntimeError(f"quantforge plan failed for {mb} MB")
        digest = hashlib.sha256(plan_body(plan_path).encode()).hexdigest()[:10]
        ours = work / f"ours-{mb:g}mb-{args.apply}-{digest}.gguf"
        if not ours.is_file():
            export_gguf(model, ours, plan=plan_path, imatrix=work / "cal" / "imatrix.gguf")
        k = kld_of(ours, base_logits, work, args.threads)
        points["quantforge dynamic plan"].append((ours.stat().st_size / 1e6, k["kld"], f"{mb:g} MB"))
        results[f"ours {mb:g} MB"] = {**k, "file_bytes": ours.stat().st_size}
        rows.append([f"(ours only, {mb:g} MB budget)", "", f"{ours.stat().st_size / 1e6:.2f}", "", "",
                     f"{k['kld']:.5f}", "", f"- / {k['same_top']:.2f}", ""])

    png = Path(__file__).resolve().parent / "planner_quality.png"
    plot_curve(points, png)

    print("bnb4", flush=True)
    bnb_plan = work / "plan-bnb4.yaml"
    if qf(["plan", str(model), "--calibration", str(work / "cal"), "--target", "bnb4", "--max-overhead", "0.10",
           "-o", str(bnb_plan), "--force"]) != 0:
        raise RuntimeError("quantforge plan --target bnb4 failed")
    from transformers import AutoTokenizer

    from quantforge.plan import load_plan

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok((d / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")[:200_000],
              add_special_tokens=False)["input_ids"]
    chunks = [ids[i * ctx:(i + 1) * ctx] for i in range(args.eval_chunks)]
    bnb = bnb_eval(model, bnb_plan, chunks)
    bplan = load_plan(bnb_plan)
    disk = bnb_checkpoint_sizes(model, bnb_plan, work)
    bnb_gain = 1.0 - bnb["dynamic"]["kld"] / bnb["uniform nf4"]["kld"]
    results["bnb4"] = {**bnb, "overhead": bplan.predicted["overhead"], "kept_16bit": len(bplan.skip_modules) - 1,
                       "kld_reduction": bnb_gain, "checkpoint_bytes": disk}
    total = time.perf_counter() - t_start
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()} | {"total": round(total, 1)}
    results["calibration"] = {"fit": sens["fit"], "n_measured": sens["n_measured"], "seconds": sens["seconds"],
                              "reused": cal.sensitivity_reused}
    (work / "results.json").write_text(json.dumps(results, indent=1))

    fit = sens["fit"]
    chosen = next((f for f in fit["fits"] if f["proxy"] == fit["chosen"]), None)
    body = table(["mix", "llama.cpp MB", "ours MB", "size diff", "llama.cpp KLD", "ours KLD", "KLD reduction",
                  "same top % (llama / ours)", ">= 20% lower"], rows)
    body += ("\n\n" + table(["bnb4", "overhead vs uniform", "modules kept 16-bit", "uniform NF4 KLD",
                             "dynamic KLD", "KLD reduction", ">= 25% lower"],
                            [["Dynamic 4-bit (simulated NF4)", f"{bplan.predicted['overhead']:+.2%}",
                              len(bplan.skip_modules) - 1, f"{bnb['uniform nf4']['kld']:.5f}",
                              f"{bnb['dynamic']['kld']:.5f}", f"{bnb_gain:.1%}",
                              "yes" if bnb_gain >= 0.25 else "no"]]))
    body += (f"\n\nModel: dithered SmolLM2-135M-Instruct. Calibration: {args.tokens} tokens (wiki.valid.raw + "
             f"c4_demo.jsonl, equal shares, {n_chunks} x {ctx}); llama-imatrix ran on the decoded text of the same "
             f"chunks. Sensitivity: {args.holdout_tokens} held-out tokens, measure={args.measure} "
             f"({sens['n_measured']} pairs measured), proxy {fit['chosen']}"
             + (" (leave-one-out log-RMSE / Spearman of each proxy: " + ", ".join(
                 f"{f['proxy']} {f['loo_rmse_log']} / {f['spearman']}" for f in fit["fits"]) + ")" if chosen else "")
             + f". Evaluation: llama-perplexity --kl-divergence vs our f16 GGUF, {args.eval_chunks} x {ctx} tokens of "
             f"wiki.test.raw (second-half scoring). Plans applied by "
             f"{APPLIED[args.apply]}. "
             f"bnb4: NF4 quantize-dequantize of the HF linears in torch, same evaluation chunks and scoring. "
             f"Curve: `benchmarks/planner_quality.png`. Wall time {total / 60:.1f} min "
             f"(calibration {timings['calibrate'] / 60:.1f} min{', reused' if cal.sensitivity_reused else ''}).")
    if disk:
        body += (f" Written with exporters/bnb4.py, the uniform and Dynamic 4-bit checkpoints' safetensors hold "
                 f"{disk['uniform'] / 1e6:.2f} MB and {disk['dynamic'] / 1e6:.2f} MB "
                 f"({disk['dynamic'] / disk['uniform'] - 1:+.2%}).")
    if args.note:
        body += " " + args.note
    print(body)
    if args.record:
        cmd = "python benchmarks/planner_quality.py " + " ".join(sys.argv[1:])
        record("Planner quality", cmd.strip(), device_line(), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
