"""CPU speed of the lattice i-quant quantizers (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ3_XXS) against llama.cpp's own
``ggml_quantize_chunk`` (the function ``llama-quantize`` runs per tensor), on the same tensors, 2 threads each.

    python benchmarks/iq_quantize.py [--repeats 3] [--types iq2_xxs,iq3_xxs,iq1_m] [--record]

Tensors: the 30 ``mlp.down_proj`` weights of SmolLM2-135M-Instruct (plain fixture; 576 x 1536 each, the only
SmolLM2 tensors whose rows are a multiple of 256), float32, with a log-normal imatrix (one per tensor, fixed
seed). Ours: ``QuantFormat.quantize`` (the C kernels of ``kernels/_cquant.c``; 2 threads take rows from a shared
counter).
llama.cpp: ``ggml_quantize_chunk`` from llama-cpp-python's ``libggml-base``, rows split over 2 Python threads
(ctypes releases the GIL). The one-time table set-up of both sides (``ggml_quantize_init``; our lattice tables)
runs before timing. Every run checks that both sides give identical bytes. The table gives the minimum over
alternating repeats (the machine is shared: the load average before and after the run is printed, and "ours cores
busy" is our process CPU time over wall time, 2.0 when both threads ran all along); the goal is a ratio
ours / llama.cpp <= 0.5.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import device_line, record, table  # noqa: E402
from helpers.reference import ggml_quantize  # noqa: E402

SECTION = "Lattice i-quants: CPU quantize speed vs ggml_quantize_chunk"


def load_tensors() -> list[torch.Tensor]:
    from safetensors import safe_open

    from quantforge import fixtures

    path = fixtures.smollm2("plain") / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = sorted((k for k in f.keys() if k.endswith("mlp.down_proj.weight")), key=lambda k: int(k.split(".")[2]))
        return [f.get_tensor(k).to(torch.float32).contiguous() for k in keys]


def ggml_two_threads(w: np.ndarray, ggml_type: int, im: np.ndarray, pool: ThreadPoolExecutor) -> np.ndarray:
    half = w.shape[0] // 2
    parts = pool.map(lambda s: ggml_quantize(w[s], ggml_type, im), [slice(0, half), slice(half, None)])
    return np.concatenate(list(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--types", default="iq2_xxs,iq3_xxs,iq1_m,iq1_s,iq2_xs")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from quantforge.formats import get_format

    tensors = load_tensors()
    g = torch.Generator().manual_seed(0)
    ims = [torch.exp(2 * torch.randn(t.shape[1], generator=g)) for t in tensors]
    n_weights = sum(t.numel() for t in tensors)
    rows, notes = [], []
    load_before = os.getloadavg()
    with ThreadPoolExecutor(2) as pool:
        for name in args.types.split(","):
            fmt = get_format(name)
            fmt.quantize(tensors[0][:2], ims[0])  # table set-up of both sides, outside the timings
            ggml_quantize(tensors[0][:2].numpy(), fmt.ggml_type, ims[0].numpy())
            ours_t, ours_cpu, ggml_t, same = [], [], [], True
            for _ in range(args.repeats):
                c0, t0 = time.process_time(), time.perf_counter()
                ours = [fmt.quantize(t, im) for t, im in zip(tensors, ims, strict=True)]
                c1, t1 = time.process_time(), time.perf_counter()
                ours_cpu.append(c1 - c0)
                theirs = [ggml_two_threads(t.numpy(), fmt.ggml_type, im.numpy(), pool)
                          for t, im in zip(tensors, ims, strict=True)]
                t2 = time.perf_counter()
                ours_t.append(t1 - t0)
                ggml_t.append(t2 - t1)
                same &= all(np.array_equal(a.numpy(), b) for a, b in zip(ours, theirs, strict=True))
            o, ref = min(ours_t), min(ggml_t)
            busy = ours_cpu[ours_t.index(o)] / o
            rows.append([name, o, ref, o / ref, n_weights / o / 1e6, busy, "yes" if same else "NO"])
            notes.append(f"- {name}: ours {', '.join(f'{v:.2f}' for v in ours_t)} s; "
                         f"llama.cpp {', '.join(f'{v:.2f}' for v in ggml_t)} s")
    load_after = os.getloadavg()
    loads = " / ".join(f"{a:.2f}, {b:.2f}, {c:.2f}" for a, b, c in (load_before, load_after))
    body = (f"SmolLM2-135M-Instruct, the 30 `mlp.down_proj` tensors (576 x 1536, {n_weights / 1e6:.1f} M weights), "
            f"log-normal imatrix, 2 threads each side, minimum of {args.repeats} alternating runs; "
            f"`date`: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
            f"load average (1, 5, 15 min) before / after the run: {loads}.\n\n"
            + table(["type", "ours s (min)", "llama.cpp s (min)", "ratio ours/llama.cpp", "ours M weights/s",
                     "ours cores busy", "bytes identical"], rows) + "\n\n" + "\n".join(notes) + "\n")
    print(body)  # noqa: T201
    if args.record:
        command = "python benchmarks/iq_quantize.py " + " ".join(sys.argv[1:])
        record(SECTION, command, device_line() + "; 2 threads each side", body)


if __name__ == "__main__":
    main()
