"""Low-bit plan quality: our dynamic GGUF plans vs llama.cpp's iq1_m, iq2_xxs and iq3_xxs imatrix mixes at the
same tensor size (+-1%), on the dithered SmolLM2, on WikiText-2 and on a text not used for calibration.

    python benchmarks/iq_quality.py [--record] [--work DIR] [--eval-chunks 8] [--tokens 8192]

The protocol of ``benchmarks/planner_quality.py`` (whose helpers this script uses), all on this machine's CPU:

1. our f16 GGUF of the dithered model: the base of llama.cpp's tools and the KLD reference;
2. our calibration (``quantforge calibrate``, default candidates: the 1- to 3-bit i-quants included) on
   wiki.valid.raw + c4_demo.jsonl -> imatrix.gguf + sensitivity.json;
3. llama.cpp's imatrix from the same calibration chunks (decoded), then ``llama-quantize --imatrix`` for each mix;
4. our plan at each mix's tensor-data size (``quantforge plan --size-mb``), applied by our exporter with our
   imatrix;
5. mean KLD of every file against the f16 base with ``llama-perplexity --kl-divergence`` (512-token chunks,
   second-half scoring) on wiki.test.raw and on LAMBADA's plain text (books; neither is calibration data).

Needs ``llama-imatrix``, ``llama-quantize`` and ``llama-perplexity`` in .bench/llama-build/bin (or $LLAMA_CPP_BIN).
The goal is a mean KLD at least 30% lower than each mix's, on both texts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH, device_line, record, table  # noqa: E402
from planner_quality import calibration_text, data_dir, kld_of, quality_subject, run, tensor_bytes, tool  # noqa: E402

# benchmarks/kernels.py would shadow Hugging Face's ``kernels`` package, which transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

SECTION = "Low-bit dynamic plans vs llama.cpp's iq1_m / iq2_xxs / iq3_xxs (dithered SmolLM2)"
MIXES = {"iq1_m": "IQ1_M", "iq2_xxs": "IQ2_XXS", "iq3_xxs": "IQ3_XXS"}
TEXTS = {"wikitext-2 test": ("wikitext-2", "wiki.test.raw"),
         "lambada (books)": ("lambada", "lambada_test_plain_text.txt")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(BENCH / "iq_quality"), help="scratch folder (cached between runs)")
    ap.add_argument("--eval-chunks", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--holdout-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = ap.parse_args()

    from quantforge.calibration.pipeline import CalibrationSettings, calibrate
    from quantforge.exporters.gguf import export_gguf

    from quantforge.cli.main import main as qf
    from quantforge.plan import load_plan

    t_start = time.perf_counter()
    work, model, data = quality_subject(args.work)
    d = data_dir()
    ctx = 512

    f16 = work / "f16.gguf"
    if not f16.is_file():
        export_gguf(model, f16, qtype="f16")
    bases = {}
    for label, (folder, name) in TEXTS.items():
        base = work / f"f16-{folder}.kld-base.bin"
        if not base.is_file():
            run([tool("llama-perplexity"), "-m", str(f16), "-f", str(d / folder / name), "--chunks",
                 str(args.eval_chunks), "-c", str(ctx), "-t", str(args.threads), "--kl-divergence-base", str(base)],
                work / f"f16-{folder}.base.log")
        bases[label] = base

    print("calibrating (ours)", flush=True)  # noqa: T201
    t0 = time.perf_counter()
    settings = CalibrationSettings(tokens=args.tokens, ctx=ctx, holdout_tokens=args.holdout_tokens)
    cal = calibrate(model, data, work / "cal", settings)
    t_cal = time.perf_counter() - t0
    sens = json.loads((work / "cal" / "sensitivity.json").read_text())

    n_chunks = calibration_text(model, data, args.tokens, ctx, args.holdout_tokens, work / "calib.txt")
    llama_imatrix = work / "llama-imatrix.gguf"
    if not llama_imatrix.is_file():
        run([tool("llama-imatrix"), "-m", str(f16), "-f", str(work / "calib.txt"), "-o", str(llama_imatrix),
             "-c", str(ctx), "--chunks", str(n_chunks), "-t", str(args.threads), "--no-ppl"],
            work / "llama-imatrix.log")

    rows, results = [], {}
    for mix, ftype in MIXES.items():
        print(mix, flush=True)  # noqa: T201
        ref = work / f"llama-{mix}.gguf"
        if not ref.is_file():
            run([tool("llama-quantize"), "--imatrix", str(llama_imatrix), str(f16), str(ref), ftype,
                 str(args.threads)], work / f"llama-{mix}.quantize.log")
        ref_bytes, ref_types = tensor_bytes(ref)
        plan_path = work / f"plan-{mix}.yaml"
        if qf(["plan", str(model), "--calibration", str(work / "cal"), "--size-mb", f"{ref_bytes / 1e6:.6f}",
               "-o", str(plan_path), "--force"]) != 0:
            raise RuntimeError(f"quantforge plan failed for {mix}")
        ours = work / f"ours-{mix}.gguf"
        export_gguf(model, ours, plan=plan_path, imatrix=work / "cal" / "imatrix.gguf", force=True)
        our_bytes, our_types = tensor_bytes(ours)
        plan = load_plan(plan_path)
        if any(our_types.get(n) != c.type for n, c in plan.tensors.items()):
            raise RuntimeError(f"the {mix} plan was not applied exactly")
        counts: dict[str, int] = {}
        for c in plan.tensors.values():
            counts[c.type] = counts.get(c.type, 0) + 1
        results[mix] = {"llama_tensor_bytes": ref_bytes, "ours_tensor_bytes": our_bytes, "plan_types": counts}
        for label, base in bases.items():
            k_ref = kld_of(ref, base, work, args.threads)
            k_ours = kld_of(ours, base, work, args.threads)
            gain = 1.0 - k_ours["kld"] / k_ref["kld"]
            results[mix][label] = {"llama": k_ref, "ours": k_ours, "kld_reduction": gain}
            rows.append([mix, label, f"{ref_bytes / 1e6:.3f}", f"{our_bytes / 1e6:.3f}",
                         f"{our_bytes / ref_bytes - 1:+.2%}", f"{k_ref['kld']:.5f}", f"{k_ours['kld']:.5f}",
                         f"{gain:.1%}", f"{k_ref['same_top']:.2f} / {k_ours['same_top']:.2f}",
                         "yes" if gain >= 0.30 else "no"])
            print(f"  {label}: llama {k_ref['kld']:.5f}  ours {k_ours['kld']:.5f}  ({gain:+.1%})",  # noqa: T201
                  flush=True)
    total = time.perf_counter() - t_start
    (work / "results.json").write_text(json.dumps(results, indent=1))
    fit = sens["fit"]
    body = table(["mix", "eval text", "llama.cpp tensor MB", "ours tensor MB", "size diff", "llama.cpp KLD",
                  "ours KLD", "KLD reduction", "same top % (llama / ours)", ">= 30% lower"], rows)
    body += "\n\nOur plans' types: " + "; ".join(
        f"{m}: " + ", ".join(f"{t} x{n}" for t, n in sorted(r["plan_types"].items())) for m, r in results.items())
    body += (f"\n\nModel: dithered SmolLM2-135M-Instruct. Calibration: {args.tokens} tokens (wiki.valid.raw + "
             f"c4_demo.jsonl, {n_chunks} x {ctx}), default candidates ({', '.join(settings.candidates)}); "
             f"llama-imatrix on the decoded text of the same chunks. Sensitivity: {args.holdout_tokens} held-out "
             f"tokens, measure={settings.measure} ({sens['n_measured']} pairs measured), proxy {fit['chosen']}. "
             f"Evaluation: llama-perplexity --kl-divergence vs our f16 GGUF, {args.eval_chunks} x {ctx} tokens of "
             f"each text (second-half scoring). Plans applied by our exporter with our imatrix. SmolLM2's 576-wide "
             f"rows fit no 256-weight block, so only ffn_down (1536-wide) can take an i-quant, in the mixes and in "
             f"our plans alike: the mixes sit near 4-5 bpw on this model. Wall time {total / 60:.1f} min "
             f"(calibration {t_cal / 60:.1f} min{', reused' if cal.sensitivity_reused else ''}); `date`: "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.")
    print(body)  # noqa: T201
    if args.record:
        record(SECTION, "python benchmarks/iq_quality.py " + " ".join(sys.argv[1:]), device_line(), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
