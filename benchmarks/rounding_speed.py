"""Optimized-rounding speed on a Llama-3.1-8B-shaped checkpoint (``export_speed.py``'s random bf16 weights,
SmolLM2 tokenizer): the input second moments ``XᵀX`` that ``calibrate --hessians`` saves, then ``quantize --type
q4_k_m --optimize gptq --calibration DIR --device D`` (and ``--optimize tune`` with ``--stages ...,tune``), each
timed as its own process (wall time, peak RSS), with the default rounding's ``quantize --type q4_k_m`` in the same
run as the anchor; ``--stages sequential`` times ``calibrate --sequential q4_k_m`` and the gptq quantize on its
statistics, in the folder ``calibrate_speed.py`` filled. On CUDA the modes' kernels are first checked against
their PyTorch references on the GPU. Goal: ``gptq`` end to end (``XᵀX`` + quantize) under 10 minutes.

    python benchmarks/rounding_speed.py --dir /tmp/l8b --tokenizer .bench/qlora/smollm2 \\
        --data ../shared/data/wikitext-2/wiki.valid.raw [--device cuda] [--tokens 32768] [--ctx 512] \\
        [--stages hessians,rtn,gptq,tune] [--layers 32]

The ``XᵀX`` stage runs :func:`quantforge.calibration.hessian_pass.calibrate_hessians`, the part of ``calibrate
--hessians`` that gptq needs (the command also runs the sensitivity stage, which quantizing does not read); the
file keeps the upper triangle of each input group's ``H`` in float32 (q/k/v share one, gate/up share one). The
``gptq`` rounding weights its block searches by the Hessian, so no imatrix is passed to either quantize. Stages
can be split over several calls (``--stages``); the checkpoint and the calibration folder in ``--dir`` are reused,
and a stage's outputs are rewritten each time it runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import measure, table  # noqa: E402
from export_speed import LLAMA_8B, QF, add_checkpoint_args, checkpoint_from_args  # noqa: E402

GOAL_S = 600.0
STAGES = ("hessians", "rtn", "gptq", "tune", "sequential")
DEFAULT_STAGES = ("hessians", "rtn", "gptq")


def hessian_bytes(cfg: dict) -> int:
    """Bytes of the packed float32 file for ``cfg``: per layer q/k/v, o and gate/up (hidden²) and down
    (intermediate²), upper triangles."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    return cfg["num_hidden_layers"] * 4 * (3 * h * (h + 1) // 2 + f * (f + 1) // 2)


def kernel_checks(device: str, R: int = 4096) -> list[list[object]]:
    """The optimized modes' GPU kernels against their PyTorch references on ``device`` (same inputs): gptq's
    feedback block, tune's code sweep and the Q4_K quantize with an imatrix that gptq calls per block."""
    import torch
    from quantforge.kernels.code_sweep import sweep_codes_reference, sweep_codes_triton
    from quantforge.kernels.feedback import feedback_block_reference, feedback_block_triton
    from quantforge.kernels.k45 import Q4_K
    from quantforge.rounding.gptq import inverse_factor

    g = torch.Generator(device=device).manual_seed(0)
    B, n = 256, 1024
    x = torch.randn(4 * n, n, generator=g, device=device)
    h = x.t() @ x / x.shape[0]
    u = inverse_factor(h[:B, :B]).contiguous()
    s = (torch.rand(B, R, generator=g, device=device) + 0.5) * 0.02
    o = -8 * s
    w = o + s * torch.rand(B, R, generator=g, device=device) * 17 - s
    values = torch.arange(16, dtype=torch.float32, device=device)
    w1, w2 = w.clone(), w.clone()
    c1, e1 = feedback_block_reference(w1, s, o, u, values, True)
    c2, e2 = feedback_block_triton(w2, s, o, u, values, True)
    rows = [[f"gptq feedback block (256 x {R})", torch.equal(c1, c2) and torch.equal(e1, e2) and torch.equal(w1, w2)]]
    st = (torch.rand(R, n, generator=g, device=device) + 0.5) * 0.02
    live = torch.rand(R, n, generator=g, device=device) > 0.05
    codes = torch.randint(0, 16, (R, n), generator=g, device=device)
    grad = (torch.randn(R, n, generator=g, device=device) * 0.01) @ h
    g1, g2, k1, k2 = grad.clone(), grad.clone(), codes.clone(), codes.clone()
    d1 = sweep_codes_reference(g1, st, live, k1, h, 128, 256, 15)
    d2 = sweep_codes_triton(g2, st, live, k2, h, 128, 256, 15)
    rows.append([f"tune code sweep ({R} rows, 128 columns)", torch.equal(d1, d2) and torch.equal(k1, k2)
                 and torch.equal(g1, g2)])
    wq = torch.randn(R, n, generator=g, device=device) * 0.02
    im = torch.rand(n, generator=g, device=device) * torch.exp(2 * torch.randn(n, generator=g, device=device))
    rows.append([f"q4_k + imatrix quantize ({R} x {n})",
                 torch.equal(Q4_K.quantize_triton(wq, im), Q4_K.quantize_reference(wq, im))])
    return rows


def sequential_rows(model: Path, cal: Path, args: argparse.Namespace) -> list[list[object]]:
    """``calibrate --sequential q4_k_m`` into ``cal`` (the folder ``calibrate_speed.py`` filled: its imatrix and
    sensitivity tables are reused by the command's cache), then ``quantize --optimize gptq`` on those statistics;
    both files are removed afterwards (the sequential file of the 32-layer model takes 33 GB)."""
    if not (cal / "imatrix.gguf").is_file():
        raise SystemExit(f"{cal / 'imatrix.gguf'} missing: run benchmarks/calibrate_speed.py with this --dir first")
    seq = cal / "sequential.safetensors"
    seq.unlink(missing_ok=True)
    cmd = [*QF, "calibrate", str(model), "--data", str(args.data), "--tokens", str(args.tokens), "--ctx",
           str(args.ctx), "--device", args.device, "-o", str(cal), "--sequential", "q4_k_m", "--quiet"]
    wall, rss = measure(cmd)
    rows = [["calibrate --sequential q4_k_m (imatrix, sensitivity cached)", round(wall, 1), round(rss),
             f"{seq.stat().st_size / 1e9:.2f} GB file"]]
    print(rows[-1], flush=True)
    out = cal.parent / "q4_k_m-seq-gptq.gguf"
    wall, rss = measure([*QF, "quantize", str(model), "--format", "gguf", "--type", "q4_k_m", "--device",
                         args.device, "-o", str(out), "--quiet", "--force", "--optimize", "gptq", "--calibration",
                         str(cal)])
    rows.append(["quantize --type q4_k_m --optimize gptq (sequential statistics)", round(wall, 1), round(rss),
                 f"{out.stat().st_size / 1e9:.2f} GB GGUF"])
    print(rows[-1], flush=True)
    out.unlink()
    seq.unlink()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_args(ap, calibration=True)
    ap.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                    help=f"comma-separated, of {', '.join(STAGES)} (default {','.join(DEFAULT_STAGES)})")
    args = ap.parse_args()
    import torch

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not stages or any(s not in STAGES for s in stages):
        raise SystemExit(f"--stages takes {', '.join(STAGES)}")
    work = Path(args.dir)
    model = checkpoint_from_args(args)
    cfg = {**LLAMA_8B, "num_hidden_layers": args.layers}
    cal = work / "cal-hessians"
    hess = cal / "hessians.safetensors"
    rows: list[list[object]] = []
    walls: dict[str, float] = {}
    if args.device == "cuda":
        print(table(["GPU kernel vs its PyTorch reference, same inputs", "identical"], kernel_checks("cuda")),
              flush=True)
    if "hessians" in stages:
        shutil.rmtree(cal, ignore_errors=True)
        code = ("import sys; from quantforge.calibration.hessian_pass import calibrate_hessians; "
                "from quantforge.calibration.settings import CalibrationSettings; "
                "r = calibrate_hessians(sys.argv[1], [sys.argv[2]], sys.argv[3], CalibrationSettings(tokens=int("
                "sys.argv[4]), ctx=int(sys.argv[5])), device=sys.argv[6]); print(r['seconds'])")
        cmd = [sys.executable, "-P", "-c", code, str(model), str(args.data), str(cal), str(args.tokens),
               str(args.ctx), args.device]
        wall, rss = measure(cmd)
        size = hess.stat().st_size
        walls["hessians"] = wall
        rows.append([f"XᵀX ({args.tokens // args.ctx} x {args.ctx} tokens; calibrate_hessians)", round(wall, 1),
                     round(rss), f"{size / 1e9:.2f} GB file (expected {hessian_bytes(cfg) / 1e9:.2f} GB packed, "
                                 f"{2 * hessian_bytes(cfg) / 1e9:.1f} GB as full matrices)"])
        print(rows[-1], flush=True)
    for mode in ("rtn", "gptq", "tune"):
        if mode not in stages:
            continue
        out = work / f"q4_k_m-{mode}.gguf"
        out.unlink(missing_ok=True)
        cmd = [*QF, "quantize", str(model), "--format", "gguf", "--type", "q4_k_m", "--device", args.device,
               "-o", str(out), "--quiet", "--force"]
        if mode != "rtn":
            if not hess.is_file():
                raise SystemExit(f"{hess} missing: run the hessians stage first")
            cmd += ["--optimize", mode, "--calibration", str(cal)]
        wall, rss = measure(cmd)
        walls[mode] = wall
        rows.append([f"quantize --type q4_k_m{'' if mode == 'rtn' else ' --optimize ' + mode}", round(wall, 1),
                     round(rss), f"{out.stat().st_size / 1e9:.2f} GB GGUF"])
        print(rows[-1], flush=True)
        if mode != "rtn":
            out.unlink()  # keeps the disk for the next call (the 8B checkpoint and XᵀX already take ~33 GB)
    if "sequential" in stages:
        rows += sequential_rows(model, work / "cal", args)
        walls["sequential"] = rows[-2][1] + rows[-1][1]
    print(f"\nLlama-3.1-8B-shaped ({args.layers} layers), device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    print(table(["stage (own process)", "wall s", "peak RSS MiB", "output"], rows))
    if "sequential" in walls:
        print(f"sequential gptq end to end (statistics + quantize, after calibrate) {walls['sequential']:.0f} s")
    for mode in ("gptq", "tune"):
        if mode in walls:
            base = f", {walls[mode] / walls['rtn']:.1f}x the default rounding's quantize" if "rtn" in walls else ""
            print(f"{mode} quantize {walls[mode]:.0f} s{base}")
    if "gptq" in walls and "hessians" in walls:
        total = walls["gptq"] + walls["hessians"]
        if args.layers == LLAMA_8B["num_hidden_layers"] and args.device == "cuda":
            print(f"goal: gptq end to end (XᵀX + quantize) under {GOAL_S / 60:.0f} minutes: "
                  f"{'met' if total < GOAL_S else 'MISSED'} ({total / 60:.1f} min)")
        else:
            print(f"gptq end to end (XᵀX + quantize) {total / 60:.1f} min; the goal (under {GOAL_S / 60:.0f} "
                  f"minutes) is for all {LLAMA_8B['num_hidden_layers']} layers on the GPU")


if __name__ == "__main__":
    main()
