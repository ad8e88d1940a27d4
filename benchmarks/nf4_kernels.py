"""NF4 kernel timings on a GPU: our Triton quantize (with and without double quant) and dequantize against
bitsandbytes' CUDA kernels, on one Llama-3.1-8B MLP weight (14336 x 4096, bf16).

    python benchmarks/nf4_kernels.py [--repeats 10] [--record]

Each op runs once to warm up (Triton compiles), then ``--repeats`` times between CUDA events; the table gives the
mean. The anchor is bitsandbytes (``quantize_4bit`` / ``dequantize_4bit``) in the same run, and every op's output
is checked against the other side's (same packed bytes and absmax, same dequantized values) before it is timed.
These are the kernels ``quantforge quantize --format bnb4 --device cuda`` runs, at the CLI's block size (64).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cuda_ms, record, table  # noqa: E402

SECTION = "NF4 kernels vs bitsandbytes (GPU)"
SHAPE = (14336, 4096)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()

    import bitsandbytes
    import bitsandbytes.functional as bnbf
    import torch
    import triton
    from quantforge.kernels import nf4

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(0)
    w = torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16)
    rows = []
    for double in (False, True):
        ours_q, ours_s = nf4.quantize_4bit_triton(w, "nf4", double)
        theirs_q, theirs_s = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double)
        same = torch.equal(ours_q.reshape(-1), theirs_q.reshape(-1)) and torch.equal(
            ours_s.absmax.reshape(-1), theirs_s.absmax.reshape(-1))
        t_ours = cuda_ms(lambda d=double: nf4.quantize_4bit_triton(w, "nf4", d), args.repeats)
        t_theirs = cuda_ms(lambda d=double: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                             compress_statistics=d), args.repeats)
        rows.append([f"quantize{' + double quant' if double else ''}", t_ours, t_theirs, t_ours / t_theirs,
                     "yes" if same else "NO"])
    q, s = nf4.quantize_4bit_triton(w, "nf4", False)
    bq, bs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    same = torch.equal(nf4.dequantize_4bit_triton(q, s, torch.bfloat16), bnbf.dequantize_4bit(bq, bs))
    t_ours = cuda_ms(lambda: nf4.dequantize_4bit_triton(q, s, torch.bfloat16), args.repeats)
    t_theirs = cuda_ms(lambda: bnbf.dequantize_4bit(bq, bs), args.repeats)
    rows.append(["dequantize to bf16", t_ours, t_theirs, t_ours / t_theirs, "yes" if same else "NO"])

    body = table(["op (14336x4096 bf16, NF4, block 64)", "ours Triton ms", "bitsandbytes CUDA ms",
                  "ratio ours/bnb", "same output"], rows)
    body += (f"\n\nMean of {args.repeats} calls after one warm-up, CUDA events; torch {torch.__version__}, "
             f"triton {triton.__version__}, bitsandbytes {bitsandbytes.__version__}. With double quant our nested "
             "absmax step runs as PyTorch ops.")
    print(body)  # noqa: T201
    if args.record:
        device = f"{torch.cuda.get_device_name()} ({platform.node()})"
        record(SECTION, "python benchmarks/nf4_kernels.py" + (f" --repeats {args.repeats}" if args.repeats != 10
                                                              else ""), device, body)


if __name__ == "__main__":
    main()
