"""AutoRound's GGUF export of a checkpoint, fed our calibration chunks (run by ``rounding_quality.py`` in its own
process: importing ``auto_round`` patches transformers).

    python -P benchmarks/autoround_gguf.py MODEL OUT_DIR --type q4_k_m --iters 0 [--data F ...] [--tokens 8192]

``--iters 0`` is AutoRound's rounding-only mode (its optimized RTN for GGUF, with an importance matrix from the
calibration data); ``--iters N`` its tuned mode (sign-gradient descent on rounding offsets and scales, block by
block, N steps each). Prints the written GGUF's path on the last line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("out_dir")
    ap.add_argument("--type", default="q4_k_m")
    ap.add_argument("--iters", type=int, default=0)
    ap.add_argument("--data", nargs="+", required=True, help="calibration files (as quantforge calibrate reads them)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--holdout", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="calibration sequences per tuning step")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from auto_round import AutoRound
    from transformers import AutoTokenizer

    from quantforge.calibration.data import load_chunks

    tok = AutoTokenizer.from_pretrained(args.model)
    chunks = load_chunks([Path(p) for p in args.data], tok, args.tokens, args.ctx, args.holdout).calibration
    dataset = [torch.tensor(c, dtype=torch.long)[None, :] for c in chunks]
    t0 = time.perf_counter()
    ar = AutoRound(args.model, scheme=f"gguf:{args.type}", iters=args.iters, nsamples=len(dataset),
                   seqlen=args.ctx, batch_size=min(args.batch, len(dataset)), dataset=dataset, device_map="cpu",
                   seed=42)
    ar.quantize_and_save(args.out_dir, format=f"gguf:{args.type}")
    files = sorted(Path(args.out_dir).rglob("*.gguf"))
    if len(files) != 1:
        raise SystemExit(f"expected one GGUF under {args.out_dir}, found {[str(f) for f in files]}")
    print(f"seconds {time.perf_counter() - t0:.1f}")
    print(files[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
