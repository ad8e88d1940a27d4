"""Optimized rounding: our GGUF files with error-feedback (``--optimize gptq``) codes vs llama.cpp's imatrix mixes
of the same name, at identical size (same type per tensor), on the dithered SmolLM2.

    python benchmarks/rounding_quality.py [--record] [--work DIR] [--mixes q4_k_m,q3_k_m,q2_k] [--eval-chunks 8]

Steps (all on this machine's CPU):

1. our f16 GGUF of the model (the base for llama.cpp's tools and the KLD reference);
2. calibration text: the chunks our calibration takes from wiki.valid.raw + c4_demo.jsonl (65536 tokens by
   default: error feedback fits the inputs' correlations, which 8192 tokens estimate poorly for 1536-wide
   inputs; llama.cpp gets the same tokens);
   llama-imatrix on their decoded text (the importance matrix both sides use), and our input second moments
   ``XᵀX`` from the same chunks (``calibrate_hessians``);
3. per mix: llama.cpp's file (``llama-quantize --imatrix``), ours with ``optimize="gptq"`` and the same imatrix,
   and (``--anchor``) ours with the default rounding and that imatrix (llama.cpp's codecs reimplemented: should
   match llama.cpp's KLD);
   ours with ``optimize="tune"`` (gptq's codes and block scales refined against the same output error);
   for the ``--sequential`` mixes, ours with ``optimize="gptq"`` on sequential statistics (``calibrate
   --sequential MIX``: inputs from the already-quantized layers, targets corrected towards the float model's
   outputs), with llama.cpp's importance matrix as every other row;
   for q4_k_m (``--plan-modes``) our dynamic plan at llama.cpp's q4_k_m size, planned and written under each rounding
   mode, and (``--plan-sequential``) the gptq plan written with gptq on sequential statistics of that plan;
   for q4_k_m (``--autoround``) AutoRound's ``gguf:q4_k_m`` export in its rounding-only (``iters=0``) and tuned
   (default iters) modes, fed the same calibration chunks (``benchmarks/autoround_gguf.py``, its own process);
4. mean KLD of every file against the f16 base with ``llama-perplexity --kl-divergence`` on two texts: 512-token
   chunks of wiki.test.raw and of LAMBADA's plain text (neither used for calibration) — the same tool for all.

Needs ``llama-imatrix``, ``llama-quantize`` and ``llama-perplexity`` in .bench/llama-build/bin (or $LLAMA_CPP_BIN).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
sys.path.insert(0, _HERE)
from _common import BENCH, device_line, record, table  # noqa: E402
from planner_quality import (  # noqa: E402
    FTYPES, calibration_text, data_dir, kld_of, quality_subject, run, tensor_bytes, tool)

# benchmarks/kernels.py would shadow Hugging Face's ``kernels`` package, which transformers imports lazily
while _HERE in sys.path:
    sys.path.remove(_HERE)

TEXTS = {"wiki.test": ("wikitext-2", "wiki.test.raw"), "lambada": ("lambada", "lambada_test_plain_text.txt")}


def base_logits(f16: Path, text: Path, chunks: int, work: Path, label: str, threads: int) -> Path:
    out = work / f"f16.{label}.kld-base.bin"
    if not out.is_file():
        run([tool("llama-perplexity"), "-m", str(f16), "-f", str(text), "--chunks", str(chunks), "-c", "512",
             "-t", str(threads), "--kl-divergence-base", str(out)], work / f"f16.{label}.base.log")
    return out


def autoround_files(model: Path, data: list[Path], args: argparse.Namespace, work: Path,
                    timings: dict[str, float], reused: list[str]) -> dict[str, Path]:
    """AutoRound's q4_k_m GGUF for each ``--autoround`` iters value (cached in ``work``), keyed by row label."""

    out: dict[str, Path] = {}
    for iters in [int(i) for i in args.autoround.split(",") if i.strip()]:
        folder = work / f"autoround-q4_k_m-iters{iters}"
        label = f"AutoRound {'rtn (iters 0)' if iters == 0 else f'tuned (iters {iters})'}"
        found = sorted(folder.rglob("*.gguf")) if folder.is_dir() else []
        if found:
            reused.append(folder.name)
            out[label] = found[0]
            continue
        t0 = time.perf_counter()
        cmd = [sys.executable, "-P", str(Path(_HERE) / "autoround_gguf.py"), str(model), str(folder), "--type",
               "q4_k_m", "--iters", str(iters), "--tokens", str(args.tokens), "--threads", str(args.threads),
               "--data", *map(str, data)]
        run(cmd, work / f"{folder.name}.log")
        timings[f"AutoRound iters {iters}"] = time.perf_counter() - t0
        out[label] = sorted(folder.rglob("*.gguf"))[0]
    return out


def sequential_gptq(model: Path, data: list[Path], args: argparse.Namespace, work: Path, label: str,
                    imatrix: Path, target: dict, export: dict, timings: dict[str, float], reused: list[str]) -> Path:
    """``calibrate --sequential`` for ``target`` (``{"qtype": MIX}`` or ``{"plan": PATH}``: each linear's inputs
    from the already-quantized layers before it, its target corrected to match the float model's output) in the
    folder ``seq-LABEL`` holding ``imatrix``, then our file written with gptq on those statistics
    (``export_gguf(**export)``), named by the statistics' key (model, data, settings, types, modes, imatrix)."""
    import shutil

    from quantforge.calibration.sequential import FILE, calibrate_sequential
    from quantforge.calibration.settings import CalibrationSettings
    from quantforge.exporters.gguf import export_gguf
    from quantforge.rounding.hessians import read_key

    folder = work / f"seq-{label}"
    folder.mkdir(exist_ok=True)
    if not (folder / "imatrix.gguf").is_file() or (folder / "imatrix.gguf").read_bytes() != imatrix.read_bytes():
        shutil.copy(imatrix, folder / "imatrix.gguf")
    settings = CalibrationSettings(tokens=args.tokens, ctx=512, holdout_tokens=args.holdout)
    res = calibrate_sequential(model, data, folder, settings, mode="gptq", **target)
    if res["reused"]:
        reused.append(f"sequential statistics ({label})")
    else:
        timings[f"{label} sequential statistics"] = res["seconds"]
    path = work / f"ours-{label}-seq-gptq-{read_key(folder / FILE)[:10]}.gguf"
    if path.is_file():
        reused.append(path.name)
    else:
        t0 = time.perf_counter()
        export_gguf(model, path, imatrix=imatrix, hessians=folder / FILE, **export)
        timings[f"{label} sequential gptq"] = time.perf_counter() - t0
    return path


def plan_files(model: Path, data: list[Path], args: argparse.Namespace, work: Path, ref_bytes: int,
               timings: dict[str, float], reused: list[str]) -> dict[str, Path]:
    """Our dynamic plan at ``ref_bytes`` of tensor data for each ``--plan-modes`` rounding mode: calibrate with the
    sensitivity measured under that mode (``calibrate --optimize MODE``, one cached table per mode in the same
    folder), ``plan --size-mb ... --optimize MODE`` (the mode recorded per tensor), written by our exporter with
    the calibration's imatrix and input second moments. Keyed by row label."""
    import hashlib

    from planner_quality import plan_body
    from quantforge.calibration.pipeline import calibrate
    from quantforge.calibration.settings import CalibrationSettings
    from quantforge.cli.main import main as qf
    from quantforge.exporters.gguf import export_gguf

    cal = work / "cal"  # holds the XᵀX of calibrate_hessians (same chunks: reused by the gptq sensitivity)
    out: dict[str, Path] = {}
    for mode in [m.strip() for m in args.plan_modes.split(",") if m.strip()]:
        t0 = time.perf_counter()
        settings = CalibrationSettings(tokens=args.tokens, ctx=512, holdout_tokens=args.holdout, rounding=mode)
        if calibrate(model, data, cal, settings, force=True).sensitivity_reused:
            reused.append(f"sensitivity ({mode})")
        else:
            timings[f"calibrate ({mode} sensitivity)"] = time.perf_counter() - t0
        plan_path = work / f"plan-q4_k_m-{mode}.yaml"
        if qf(["plan", str(model), "--calibration", str(cal), "--size-mb", f"{ref_bytes / 1e6:.6f}", "--optimize",
               mode, "-o", str(plan_path), "--force"]) != 0:
            raise RuntimeError(f"quantforge plan --optimize {mode} failed")
        digest = hashlib.sha256(plan_body(plan_path).encode()).hexdigest()[:10]
        path = work / f"ours-plan-q4_k_m-{mode}-{digest}.gguf"
        t0 = time.perf_counter()
        if path.is_file():
            reused.append(path.name)
        else:
            export_gguf(model, path, plan=plan_path, imatrix=cal / "imatrix.gguf",
                        hessians=cal / "hessians.safetensors")
            timings[f"plan q4_k_m {mode}"] = time.perf_counter() - t0
        out[f"dynamic plan + {mode}"] = path
        if mode == "gptq" and args.plan_sequential:
            out["dynamic plan + sequential gptq"] = sequential_gptq(
                model, data, args, work, "plan", cal / "imatrix.gguf", {"plan": plan_path}, {"plan": plan_path},
                timings, reused)
    return out


def seq_damp() -> float:
    from quantforge.calibration.sequential import DAMP

    return DAMP


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(BENCH / "rounding"), help="scratch folder (cached between runs)")
    ap.add_argument("--mixes", default="q4_k_m,q3_k_m,q2_k")
    ap.add_argument("--eval-chunks", type=int, default=8, help="512-token chunks of each evaluation text")
    ap.add_argument("--tokens", type=int, default=65536, help="calibration tokens, both sides (default 65536)")
    ap.add_argument("--holdout", type=int, default=512,
                    help="held-out tokens of the dynamic plans' sensitivity measurements (calibrate --holdout-tokens)")
    ap.add_argument("--anchor", action="store_true", help="also our default rounding (expected to equal llama.cpp)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    ap.add_argument("--note", default="", help="a sentence appended to the recorded notes")
    ap.add_argument("--no-tune", action="store_true", help="leave out our tuned mode (optimize='tune')")
    ap.add_argument("--autoround", default="0,200",
                    help="AutoRound iters to run for q4_k_m (0: its rounding-only mode, 200: its default tuning); "
                         "'' for none")
    ap.add_argument("--sequential", default="q4_k_m",
                    help="mixes that also get a row with gptq on sequential statistics (calibrate --sequential); "
                         "'' for none")
    ap.add_argument("--plan-modes", default="rtn,gptq",
                    help="q4_k_m: our dynamic plan at llama.cpp's q4_k_m tensor size, planned and written under each "
                         "of these rounding modes; '' for none")
    ap.add_argument("--plan-sequential", action="store_true",
                    help="also the gptq plan written with gptq on sequential statistics (calibrate --sequential "
                         "plan.yaml)")
    args = ap.parse_args()

    from quantforge.calibration.hessian_pass import calibrate_hessians
    from quantforge.calibration.settings import CalibrationSettings
    from quantforge.exporters.gguf import export_gguf

    t_start = time.perf_counter()
    work, model, data = quality_subject(args.work)
    d = data_dir()
    ctx, holdout = 512, args.holdout
    timings: dict[str, float] = {}

    f16 = work / "f16.gguf"
    if not f16.is_file():
        export_gguf(model, f16, qtype="f16")
    bases = {}
    for label, (folder, name) in TEXTS.items():
        text = work / f"eval.{label}.txt"
        text.write_text((d / folder / name).read_text(encoding="utf-8"))
        bases[label] = base_logits(f16, text, args.eval_chunks, work, label, args.threads)

    print("calibrating", flush=True)
    calib_txt = work / "calib.txt"
    n_chunks = calibration_text(model, data, args.tokens, ctx, holdout, calib_txt)
    imatrix = work / "llama-imatrix.gguf"
    reused: list[str] = []
    t0 = time.perf_counter()
    if not imatrix.is_file():
        run([tool("llama-imatrix"), "-m", str(f16), "-f", str(calib_txt), "-o", str(imatrix), "-c", str(ctx),
             "--chunks", str(n_chunks), "-t", str(args.threads), "--no-ppl"], work / "llama-imatrix.log")
        timings["llama-imatrix"] = time.perf_counter() - t0
    else:
        reused.append("llama-imatrix")
    settings = CalibrationSettings(tokens=args.tokens, ctx=ctx, holdout_tokens=holdout)
    hess = calibrate_hessians(model, data, work / "cal", settings)
    if hess["reused"]:
        reused.append("XᵀX")
    else:
        timings["XᵀX"] = hess["seconds"]

    rows, results = [], {}
    sizes: dict[str, tuple[int, int]] = {}
    plan_sizes: dict[str, int] = {}
    for mix in [m.strip() for m in args.mixes.split(",") if m.strip()]:
        print(mix, flush=True)
        ref = work / f"llama-{mix}.gguf"
        if not ref.is_file():
            run([tool("llama-quantize"), "--imatrix", str(imatrix), str(f16), str(ref), FTYPES[mix],
                 str(args.threads)], work / f"llama-{mix}.quantize.log")
        files = {"llama.cpp": ref}
        variants = [("gptq", "gptq")] + ([("rtn", "ours rtn")] if args.anchor else [])
        variants += [] if args.no_tune else [("tune", "tune")]
        for mode, label in variants:
            path = work / f"ours-{mix}-{mode}.gguf"
            t0 = time.perf_counter()
            if not path.is_file():
                export_gguf(model, path, qtype=mix, imatrix=imatrix, optimize=mode,
                            hessians=work / "cal" / "hessians.safetensors")
                timings[f"{mix} {mode}"] = time.perf_counter() - t0
            else:
                reused.append(path.name)
            files[label] = path
        if mix in [m.strip() for m in args.sequential.split(",") if m.strip()]:
            files["sequential gptq"] = sequential_gptq(model, data, args, work, mix, imatrix, {"qtype": mix},
                                                       {"qtype": mix, "optimize": "gptq"}, timings, reused)
        ref_bytes, ref_types = tensor_bytes(ref)
        foreign = autoround_files(model, data, args, work, timings, reused) if mix == "q4_k_m" else {}
        files.update(foreign)
        planned = plan_files(model, data, args, work, ref_bytes, timings, reused) if mix == "q4_k_m" else {}
        files.update(planned)
        entry: dict[str, dict[str, float]] = {}
        for label, path in files.items():
            nbytes, types = tensor_bytes(path)
            if label in planned:
                if nbytes > ref_bytes:
                    raise RuntimeError(f"{path.name}: {nbytes} tensor bytes, over llama.cpp's {mix} ({ref_bytes})")
                plan_sizes[label] = nbytes
            elif label in foreign:
                sizes[label] = (nbytes, sum(types.get(k) != v for k, v in ref_types.items()))
            elif nbytes != ref_bytes or types != ref_types:
                raise RuntimeError(f"{path.name}: tensor types/bytes differ from llama.cpp's {mix}")
            entry[label] = {t: kld_of(path, bases[t], work, args.threads)["kld"] for t in TEXTS}
            entry[label]["mean"] = sum(entry[label][t] for t in TEXTS) / len(TEXTS)
        results[mix] = {"tensor_bytes": ref_bytes, **entry}
        for label in files:
            if label == "llama.cpp":
                continue
            e, r = entry[label], entry["llama.cpp"]
            mb = f"{ref_bytes / 1e6:.2f}" if label not in foreign else (
                f"{sizes[label][0] / 1e6:.2f} (llama.cpp {ref_bytes / 1e6:.2f}; {sizes[label][1]} tensor types differ)")
            if label in plan_sizes:
                mb = f"{plan_sizes[label] / 1e6:.2f} (llama.cpp {ref_bytes / 1e6:.2f}; per-tensor types)"
            rows.append([mix, label, mb,
                         *(f"{r[t]:.5f} / {e[t]:.5f}" for t in TEXTS),
                         f"{e['mean'] / r['mean']:.3f}", f"{1 - e['mean'] / r['mean']:.1%}"])
            print("  " + " | ".join(rows[-1]), flush=True)

    total = time.perf_counter() - t_start
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()} | {"total": round(total, 1)}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    body = table(["mix", "ours", "tensor MB (both)", "KLD wiki.test (llama.cpp / ours)",
                  "KLD lambada (llama.cpp / ours)", "mean KLD ratio ours / llama.cpp", "KLD reduction"], rows)
    body += (f"\n\nModel: dithered SmolLM2-135M-Instruct. Calibration: {args.tokens} tokens (wiki.valid.raw + "
             f"c4_demo.jsonl, equal shares, {n_chunks} x {ctx}); llama-imatrix ran on their decoded text and both "
             "sides quantize with that importance matrix; our input second moments XᵀX come from the same chunks. "
             "Both files of a row have the same type for every tensor (checked). Evaluation: llama-perplexity "
             f"--kl-divergence vs our f16 GGUF, {args.eval_chunks} x 512 tokens of wiki.test.raw and of LAMBADA's "
             "plain text (second-half scoring); the ratio is of the mean over both texts. Stage times (s): "
             + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
             + (f"; reused from an earlier run in the same folder: {', '.join(reused)}" if reused else "")
             + f". Wall time {total / 60:.1f} min."
             + (" AutoRound rows: its own GGUF writer and q4_k_m mix rules (size and tensor types in the MB column, "
                f"not forced equal), {args.tokens} calibration tokens as {n_chunks} x {ctx}-token sequences (ours), "
                "CPU." if sizes else "")
             + (f" Dynamic plan rows: our calibration (same chunks; its own imatrix, hold-out {args.holdout} "
                "tokens, sampled KLD measurements) with the sensitivity measured under the row's rounding mode, "
                "'quantforge plan --size-mb <llama.cpp q4_k_m tensor MB> --optimize MODE', written by our exporter; "
                "tensor types differ from llama.cpp's by design (size at most llama.cpp's, checked)."
                if plan_sizes else "")
             + (" 'dynamic plan + sequential gptq': the gptq plan's file written with gptq on sequential statistics "
                "of that plan (calibrate --sequential plan.yaml: its types and modes in the quantized stream, the plan "
                "calibration's imatrix)." if "dynamic plan + sequential gptq" in plan_sizes else "")
             + (" Sequential rows: correction ridge "
                f"{seq_damp()} x mean diag H." if any("sequential" in r[1] for r in rows) else ""))
    if args.note:
        body += " " + args.note
    print(body)
    if args.record:
        cmd = "python benchmarks/rounding_quality.py " + " ".join(sys.argv[1:])
        record("Optimized rounding (gptq) vs llama.cpp imatrix mixes", cmd.strip(), device_line(), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
