"""Where calibration's candidate round trips run on a GPU machine: each default candidate's encode + decode of a GPU
weight, timed as calibration places it (``calibration.candidates.fake_quantize``: the ``HOST_ENCODED`` types on the
host's C kernels, the rest on the GPU), with the GPU codec and the host's C kernels alone beside it, at the shapes
the sensitivity stage hands them on a Llama-3.1-8B-shaped layer: a sampled q/k/v group (768 x 4096), a sampled
``ffn_down`` (256 x 14336) and a whole ``ffn_gate`` (14336 x 4096, the measured pairs). Each cell is a first call
and, after ``/``, a second call; the process starts with an empty Triton cache, so the first path (in the order of
the columns) to run a kernel pays its compile. The values of the three paths are checked equal.

    python benchmarks/codec_placement.py [--types iq1_s,q4_k] [--shapes 768x4096,256x14336,14336x4096]

Weights are random (``randn * 0.02``) with a random positive imatrix, made on the host and copied to the GPU: the
codecs' speed does not depend on the weights' values beyond their searches' data-independent loop counts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402

SHAPES = "768x4096,256x14336,14336x4096"


def _timed(fn) -> tuple[float, object]:
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        out = fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan"), None
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _cell(first: float, second: float) -> str:
    if first != first:
        return "out of memory"
    return f"{first:.3f} / {second:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="")
    ap.add_argument("--shapes", default=SHAPES)
    args = ap.parse_args()
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-placement-")
    import torch
    from quantforge.calibration import candidates as cand
    from quantforge.formats import get_format

    if not torch.cuda.is_available():
        raise SystemExit("codec_placement.py needs a CUDA device")
    types = [t for t in args.types.split(",") if t] or list(cand.DEFAULT_CANDIDATES)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    g = torch.Generator().manual_seed(0)
    rows, same = [], True
    for t in types:
        f = None if t == "nf4" else get_format(t)
        for r, n in shapes:
            w = torch.randn(r, n, generator=g) * 0.02
            im = torch.rand(n, generator=g) + 0.1
            wd, imd = w.cuda(), im.cuda()
            placed = [_timed(lambda: cand.fake_quantize(wd, t, imd)) for _ in range(2)]
            if f is None:
                gpu = placed
                host = [(float("nan"), None)] * 2
            else:
                qi = imd if f.takes_imatrix else None
                gpu = [_timed(lambda: f.dequantize(f.quantize(wd, qi)).reshape(wd.shape)) for _ in range(2)]
                host = [_timed(lambda: f.dequantize(f.quantize(w, None if qi is None else im)).reshape(w.shape))
                        for _ in range(2)]
            outs = [o for _, o in (placed[1], gpu[1], host[1]) if o is not None]
            ok = all(torch.equal(outs[0].cpu(), o.cpu()) for o in outs[1:])
            same &= ok
            where = "host" if t in cand.HOST_ENCODED else "gpu"
            rows.append([t, f"{r} x {n}", where, _cell(placed[0][0], placed[1][0]), _cell(gpu[0][0], gpu[1][0]),
                         "-" if f is None else _cell(host[0][0], host[1][0]), "yes" if ok else "NO"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    print(f"\n{torch.cuda.get_device_name()}, {os.cpu_count()} host cores, torch {torch.__version__}; seconds, first "
          "call / second call")
    print(table(["type", "shape", "calibration encodes on", "as placed", "GPU codec", "host C kernels",
                 "same values"], rows))
    print(f"all three paths give the same values: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
