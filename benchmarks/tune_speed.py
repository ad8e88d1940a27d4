"""Speed of optimized rounding on one decoder layer of a Llama-3.1-8B-shaped model: the seven linear weights
(random, 0.02 scale) with input second moments from random correlated activations, encoded in the row chunks the
GGUF exporter hands a rounder, by ``gptq`` and by ``tune`` (gptq's codes refined: its time includes gptq's), with
q4_k_m's types (q6_k for attn_v and ffn_down, q4_k elsewhere); the whole-model time is the layer's times 32.

    python benchmarks/tune_speed.py [--device cuda] [--sweeps 4] [--scale 1.0] [--modes gptq,tune]

``--scale`` shrinks every dimension (rounded to 256) for a quick check on a CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_line, table  # noqa: E402

LAYER = (("attn_q", 4096, 4096, "q4_k"), ("attn_k", 1024, 4096, "q4_k"), ("attn_v", 1024, 4096, "q6_k"),
         ("attn_output", 4096, 4096, "q4_k"), ("ffn_gate", 14336, 4096, "q4_k"), ("ffn_up", 14336, 4096, "q4_k"),
         ("ffn_down", 4096, 14336, "q6_k"))
LAYERS = 32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sweeps", type=int, default=None, help="tune's exact passes (default: the mode's)")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--modes", default="gptq,tune", help="'gptq' alone skips the tuned mode")
    args = ap.parse_args()

    import torch

    from quantforge.exporters.gguf.pipeline import chunk_elems_for
    from quantforge.exporters.gguf.writer import CHUNK_ELEMS
    from quantforge.formats import get_format
    from quantforge.rounding.gptq import FactorCache, GptqRounder
    from quantforge.rounding.tune import SWEEPS, SecondMoments, TuneRounder

    dev = torch.device(args.device)
    sweeps = SWEEPS if args.sweeps is None else args.sweeps

    def dim(v: int) -> int:
        return max(256, round(v * args.scale / 256) * 256)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    g = torch.Generator(device=dev).manual_seed(0)
    hs: dict[int, torch.Tensor] = {}
    rows, totals = [], {"gptq": 0.0, "tune": 0.0}
    for name, r, n, qtype in LAYER:
        r, n = dim(r), dim(n)
        if n not in hs:
            x = torch.randn(2 * n, n, device=dev, generator=g)
            x = (x + x.roll(1, dims=1)) * torch.exp(torch.randn(n, device=dev, generator=g))
            hs[n] = x.t() @ x / x.shape[0]
            del x
        h = hs[n]
        w = torch.randn(r, n, device=dev, generator=g) * 0.02
        fmt = get_format(qtype)
        gptq = GptqRounder(fmt, lambda h=h: h, name, FactorCache())
        tune = TuneRounder(fmt, lambda h=h: h, name, GptqRounder(fmt, lambda h=h: h, name, FactorCache()),
                           SecondMoments(), sweeps=sweeps)
        step = max(1, chunk_elems_for(dev, CHUNK_ELEMS) // n)
        imatrix = torch.diagonal(h).clone()
        times = {}
        for label, rounder in (("gptq", gptq), ("tune", tune)):
            if label not in args.modes.split(","):
                times[label] = float("nan")
                continue
            sync()
            t0 = time.perf_counter()
            for s in range(0, r, step):
                rounder(w[s:s + step], imatrix)
            sync()
            times[label] = time.perf_counter() - t0
            totals[label] += times[label]
        rows.append([name, f"{r} x {n}", qtype, -(-r // step), f"{times['gptq']:.2f}", f"{times['tune']:.2f}"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    rows.append(["one layer", "", "", "", f"{totals['gptq']:.1f}", f"{totals['tune']:.1f}"])
    rows.append([f"x {LAYERS} layers", "", "", "", f"{totals['gptq'] * LAYERS / 60:.1f} min",
                 f"{totals['tune'] * LAYERS / 60:.1f} min"])
    print(f"device: {device_line() if dev.type == 'cpu' else torch.cuda.get_device_name(dev)}; tune sweeps {sweeps}; "
          f"scale {args.scale}")
    print(table(["tensor", "rows x cols", "type", "row chunks", "gptq s", "tune s (incl. gptq)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
