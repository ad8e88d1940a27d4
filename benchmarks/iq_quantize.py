"""CPU speed of the lattice i-quant quantizers (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ3_XXS) against llama.cpp's own
``ggml_quantize_chunk`` (the function ``llama-quantize`` runs per tensor), on the same tensors, 2 threads each.

    python benchmarks/iq_quantize.py [--repeats 3] [--types iq2_xxs,iq3_xxs,iq1_m] [--record]
    python benchmarks/iq_quantize.py --whole IMATRIX.gguf [--repeats 3] [--types iq2_xxs,iq3_xxs,iq1_m] [--record]

Tensors: the 30 ``mlp.down_proj`` weights of SmolLM2-135M-Instruct (plain fixture; 576 x 1536 each, the only
SmolLM2 tensors whose rows are a multiple of 256), float32, with a log-normal imatrix (one per tensor, fixed
seed). Ours: ``QuantFormat.quantize`` (the C kernels of ``kernels/_cquant.c``; 2 threads take rows from a shared
counter).
llama.cpp: ``ggml_quantize_chunk`` from llama-cpp-python's ``libggml-base``, rows split over 2 Python threads
(ctypes releases the GIL). The one-time table set-up of both sides (``ggml_quantize_init``; our lattice tables)
runs before timing. Every run checks that both sides give identical bytes. The table gives the minimum over
alternating repeats (the machine is shared: the load average before and after the run is printed, and "ours cores
busy" is our process CPU time over wall time, 2.0 when both threads ran all along); the goal is a ratio
ours / llama.cpp <= 0.5. These are quantizer (kernel) timings on the tensors that take the type.

``--whole IMATRIX`` times the commands a user runs instead, on the whole model, with a llama.cpp importance
matrix of SmolLM2 (e.g. the ``llama-imatrix.gguf`` that ``benchmarks/iq_quality.py`` makes): ``quantforge quantize
SMOLLM2 --format gguf --type T --imatrix IMATRIX`` (from the safetensors checkpoint, a fresh process, default
threads) against ``llama-quantize --imatrix IMATRIX F16.gguf OUT T 2`` (built by ``benchmarks/build_llama_cpp.sh``;
its f16 input is written once beforehand, untimed), alternating, and compares the two files tensor by tensor.
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
from _common import LLAMA_BIN, device_line, measure, record, table  # noqa: E402
from helpers.reference import ggml_quantize  # noqa: E402

SECTION = "Lattice i-quants: CPU quantize speed vs ggml_quantize_chunk"
WHOLE_SECTION = "Lattice i-quant mixes: whole-model CPU quantize vs llama-quantize"


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


def whole_model(imatrix: Path, types: list[str], repeats: int) -> str:
    """The CLI against ``llama-quantize`` on the whole SmolLM2 model, 2 cores; returns the printed table."""
    import tempfile

    from quantforge import fixtures
    from quantforge.exporters.gguf import export_gguf

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpu_quantize import identical_tensors

    model = fixtures.smollm2("plain")
    rows, notes = [], []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        f16 = Path(tmp) / "f16.gguf"
        export_gguf(model, f16, qtype="f16")
        for name in types:
            ours_out, llama_out = Path(tmp) / f"ours-{name}.gguf", Path(tmp) / f"llama-{name}.gguf"
            ours_cmd = [sys.executable, "-P", "-m", "quantforge.cli.main", "quantize", str(model), "--format", "gguf",
                        "--type", name, "--imatrix", str(imatrix), "-o", str(ours_out), "--force", "--quiet"]
            llama_cmd = [str(LLAMA_BIN / "llama-quantize"), "--imatrix", str(imatrix), str(f16), str(llama_out),
                         name.upper(), "2"]
            ours_t, llama_t = [], []
            for _ in range(repeats):
                ours_t.append(measure(ours_cmd)[0])
                llama_t.append(measure(llama_cmd)[0])
            same, count = identical_tensors(ours_out, llama_out)
            o, ref = min(ours_t), min(llama_t)
            rows.append([name, o, ref, o / ref, f"{same}/{count}"])
            notes.append(f"- {name}: ours {', '.join(f'{v:.2f}' for v in ours_t)} s; "
                         f"llama-quantize {', '.join(f'{v:.2f}' for v in llama_t)} s")
    loads = " / ".join(f"{a:.2f}, {b:.2f}, {c:.2f}" for a, b, c in (load_before, os.getloadavg()))
    return (f"SmolLM2-135M-Instruct (plain), whole model, importance matrix `{imatrix.name}`; ours from the "
            f"safetensors checkpoint (process start and imports included), llama-quantize from the f16 GGUF; "
            f"minimum of {repeats} alternating runs; load average (1, 5, 15 min) before / after: {loads}.\n\n"
            + table(["mix", "quantforge quantize s (min)", "llama-quantize s (min)", "ratio", "tensors identical"],
                    rows) + "\n\n" + "\n".join(notes) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--types", default="iq2_xxs,iq3_xxs,iq1_m,iq1_s,iq2_xs")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--whole", type=Path, default=None, metavar="IMATRIX",
                    help="time the CLI on the whole model against llama-quantize, with this llama.cpp imatrix")
    args = ap.parse_args()
    if args.whole is not None:
        body = whole_model(args.whole, args.types.split(","), args.repeats)
        print(body)  # noqa: T201
        if args.record:
            record(WHOLE_SECTION, "python benchmarks/iq_quantize.py " + " ".join(sys.argv[1:]), device_line(), body)
        return
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
