"""The GPU quantize paths in one run: bytes, kernel time, end-to-end exports.

1. bytes on the GPU: the Triton Q4_K, Q5_K, Q6_K (with and without an imatrix) and Q8_0 kernels against their PyTorch
   reference codecs run on the same GPU, and the IQ2_XXS GPU path (Triton row sums, neighbour search and
   coordinate descent) against the PyTorch reference path (the padded-gather search) on the same GPU; after the
   timings, the same GPU paths against the C CPU quantizers (:mod:`quantforge.kernels._cpu_fast`, llama.cpp's
   bytes) when the extension is built by then (the device call compiles it in the background);
2. time per 64M-weight-class chunk (an ``ffn`` matrix, 14336 x 4096 float32, already on the GPU), CUDA events,
   after a warm-up: Q4_K / Q6_K / Q8_0 / IQ2_XXS, the PyTorch reference beside each new kernel;
3. the output file's write path on this machine: ``--io-gb`` GB of fresh file written with ``pwrite`` from 1 and 4
   threads (what the exporter's writer threads do) and copied into a shared ``mmap`` of the file from 4 threads;
4. end to end: ``quantforge quantize`` as a subprocess (warm page cache) on a Llama-3.1-8B-shaped checkpoint of
   ``--layers`` layers (``export_speed.py``'s builder), for ``--types``; iq2_xxs with a synthetic imatrix (one
   log-normal vector per tensor, written as llama.cpp's GGUF imatrix), plus the pipeline's stage timers of one
   in-process export per type in ``--profile``.

    python benchmarks/quantize_gpu_check.py --dir /tmp/qgc --tokenizer .bench/qlora/smollm2 --layers 8 \\
        [--types iq2_xxs,q8_0,q6_k] [--profile q8_0] [--skip-e2e]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402
from export_speed import (IMATRIX_MIXES, LLAMA_8B, build_checkpoint, ours, profile_run,  # noqa: E402
                          synthetic_imatrix, warm_page_cache)


def _heavy(rows: int, n: int, seed: int, device: str):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(rows, n, generator=g, device=device) * 0.02
    w[: rows // 8] *= torch.exp(2 * torch.randn(rows // 8, n, generator=g, device=device))
    w[1, :256] = 0.0
    w[2, :64] = torch.tensor([1.0, -1.0], device=device).repeat(32)
    return w


def _imatrix(n: int, seed: int, device: str):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(n, generator=g, device=device) * torch.exp(2 * torch.randn(n, generator=g, device=device))


def check_bytes() -> list[list[object]]:
    """(path, weights, identical blocks, total blocks) for each GPU kernel against its reference on the GPU."""
    import torch
    from quantforge.kernels import _iq_common, iq2_xxs, k45, q6_k, q8_0

    dev = "cuda"
    rows = []

    def blocks(a: torch.Tensor, b: torch.Tensor, ts: int) -> tuple[int, int]:
        x, y = a.reshape(-1, ts), b.reshape(-1, ts)
        return int((x == y).all(dim=1).sum()), x.shape[0]

    w = _heavy(2048, 4096, 1, dev)
    im = _imatrix(4096, 2, dev)
    for label, got, ref, ts in (
            ("q8_0 triton vs torch", q8_0.quantize_triton(w), q8_0.quantize_reference(w), 34),
            ("q6_k triton vs torch", q6_k.quantize_triton(w), q6_k.quantize_reference(w), 210),
            ("q6_k+imatrix triton vs torch", q6_k.quantize_triton(w, im), q6_k.quantize_reference(w, im), 210),
            ("q4_k triton vs torch", k45.Q4_K.quantize_triton(w), k45.Q4_K.quantize_reference(w), 144),
            ("q4_k+imatrix triton vs torch", k45.Q4_K.quantize_triton(w, im), k45.Q4_K.quantize_reference(w, im),
             144),
            ("q5_k+imatrix triton vs torch", k45.Q5_K.quantize_triton(w, im), k45.Q5_K.quantize_reference(w, im),
             176)):
        same, total = blocks(got, ref, ts)
        rows.append([label, w.numel(), same, total, "yes" if same == total else "NO"])
    w = _heavy(256, 4096, 3, dev)
    got = iq2_xxs.quantize(w, im)
    on_gpu = _iq_common.on_gpu
    _iq_common.on_gpu = lambda t: False
    try:
        ref = iq2_xxs.quantize(w, im)
    finally:
        _iq_common.on_gpu = on_gpu
    same, total = blocks(got, ref, 66)
    rows.append(["iq2_xxs+imatrix gpu path vs torch", w.numel(), same, total, "yes" if same == total else "NO"])
    return rows


def check_cpu() -> list[list[object]]:
    """The GPU paths against the C CPU quantizers on the same weights (empty when the extension is not built)."""
    from quantforge.kernels import _cpu_fast, iq2_xxs, k45, q6_k, q8_0

    if _cpu_fast.library() is None:
        print(f"C quantizers unavailable: {_cpu_fast.load_error()}")
        return []
    w = _heavy(512, 4096, 6, "cuda")
    im = _imatrix(4096, 7, "cuda")
    rows = []
    for label, fn, m, ts in (("q8_0", q8_0.quantize, None, 34), ("q6_k", q6_k.quantize, None, 210),
                             ("q6_k+imatrix", q6_k.quantize, im, 210), ("iq2_xxs+imatrix", iq2_xxs.quantize, im, 66),
                             ("q4_k+imatrix", k45.Q4_K.quantize, im, 144),
                             ("q5_k+imatrix", k45.Q5_K.quantize, im, 176)):
        gpu = fn(w, m).cpu().reshape(-1, ts)
        cpu = fn(w.cpu(), None if m is None else m.cpu()).reshape(-1, ts)
        same = int((gpu == cpu).all(dim=1).sum())
        rows.append([f"{label} gpu vs C cpu", w.numel(), same, cpu.shape[0],
                     "yes" if same == cpu.shape[0] else "NO"])
    return rows


def time_kernels(repeats: int) -> list[list[object]]:
    """(path, ms per 14336 x 4096 chunk, weights/s) for each quantize path."""
    import torch
    from quantforge.kernels import _iq_common, iq2_xxs, k45, q6_k, q8_0

    w = _heavy(14336, 4096, 4, "cuda")
    im = _imatrix(4096, 5, "cuda")

    def torch_iq2(x, m):
        on_gpu = _iq_common.on_gpu
        _iq_common.on_gpu = lambda t: False
        try:
            return iq2_xxs.quantize(x, m)
        finally:
            _iq_common.on_gpu = on_gpu

    small = w[:2048]
    cases = [("q4_k triton", lambda: k45.Q4_K.quantize_triton(w), w),
             ("q4_k+imatrix triton", lambda: k45.Q4_K.quantize_triton(w, im), w),
             ("q4_k+imatrix torch (before)", lambda: k45.Q4_K.quantize_reference(w, im), w),
             ("q6_k triton", lambda: q6_k.quantize_triton(w), w),
             ("q6_k+imatrix triton", lambda: q6_k.quantize_triton(w, im), w),
             ("q6_k torch (before)", lambda: q6_k.quantize_reference(w), w),
             ("q8_0 triton", lambda: q8_0.quantize_triton(w), w),
             ("q8_0 torch (before)", lambda: q8_0.quantize_reference(w), w),
             ("iq2_xxs+imatrix gpu path", lambda: iq2_xxs.quantize(w, im), w),
             ("iq2_xxs+imatrix torch (before), 2048 rows", lambda: torch_iq2(small, im), small)]
    rows = []
    for label, fn, x in cases:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        host = (time.perf_counter() - t0) / repeats
        ms = start.elapsed_time(end) / repeats
        rows.append([label, x.numel(), ms, host * 1e3, x.numel() / (ms / 1e3) / 1e9])
        print(table(["path", "weights", "GPU ms", "host ms", "Gweights/s"], rows[-1:]), flush=True)
    return rows


def io_probe(path: Path, gb: float, chunk: int = 64 << 20) -> list[list[object]]:
    """(method, threads, GB/s) writing ``gb`` GB of a fresh file in ``chunk``-byte pieces at their offsets."""
    import mmap
    import os
    from concurrent.futures import ThreadPoolExecutor

    import torch

    n = int(gb * 1e9) // chunk
    src = torch.ones(chunk, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    view = memoryview(src.numpy())
    rows = []

    def pwrite_all(threads: int) -> float:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, n * chunk)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: os.pwrite(fd, view, i * chunk), range(n)))
        dt = time.perf_counter() - t0
        os.close(fd)
        os.unlink(path)
        return dt

    for threads in (1, 4):
        rows.append(["pwrite", threads, n * chunk / pwrite_all(threads) / 1e9])
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, n * chunk)
    mm = mmap.mmap(fd, n * chunk)
    dt = _mmap_copy(mm, src, n, chunk)
    mm.close()
    os.close(fd)
    os.unlink(path)
    rows.append(["mmap copy", 4, n * chunk / dt / 1e9])
    return rows


def _mmap_copy(mm, src, n: int, chunk: int) -> float:
    """Seconds to copy ``src`` into each of the ``n`` chunks of the mapping from 4 threads."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    dst = torch.frombuffer(mm, dtype=torch.uint8)

    def put(i: int) -> None:
        dst[i * chunk:(i + 1) * chunk].copy_(src)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put, range(n)))
    return time.perf_counter() - t0


def _step(label: str, fn, *args):
    """Run one part of the check; a failure is printed and the next part still runs (one device call)."""
    t0 = time.perf_counter()
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - reported, not swallowed: the table says the part failed
        print(f"{label} FAILED:\n{traceback.format_exc()}", flush=True)
        return None
    finally:
        print(f"({label}: {time.perf_counter() - t0:.1f} s)\n", flush=True)


def end_to_end(args: argparse.Namespace) -> None:
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    print(table(["write path", "threads", "GB/s"], io_probe(work / "io-probe.bin", args.io_gb)), flush=True)
    cfg = {**LLAMA_8B, "num_hidden_layers": args.layers}
    t0 = time.perf_counter()
    model = build_checkpoint(work / "ckpt", cfg, Path(args.tokenizer), device="cuda")
    shards = sorted(model.glob("*.safetensors"))
    gb = sum(p.stat().st_size for p in shards) / 1e9
    print(f"\ncheckpoint: {args.layers} layers, {gb:.2f} GB ({time.perf_counter() - t0:.1f} s)", flush=True)
    imat = synthetic_imatrix(model, work / "imatrix.gguf")
    rows = []
    for qtype in [t for t in args.types.split(",") if t]:
        out = work / f"{qtype}.gguf"
        warm_page_cache(shards)
        s, rss = ours(model, qtype, out, "cuda", imatrix=imat if qtype in IMATRIX_MIXES else None)
        rows.append([qtype, s, rss, out.stat().st_size / 1e9])
        print(table(["type", "warm s", "peak RSS MiB", "file GB"], rows[-1:]), flush=True)
        out.unlink()
    for qtype in [t for t in args.profile.split(",") if t]:
        warm_page_cache(shards)
        print(f"\nstage timers, {qtype}, warm page cache, in-process")
        print(profile_run(model, qtype, work / "profile.gguf", "cuda", imat if qtype in IMATRIX_MIXES else None),
              flush=True)
        (work / "profile.gguf").unlink(missing_ok=True)
    print(f"\nend to end, {args.layers}-layer Llama-3.1-8B-shaped checkpoint ({gb:.2f} GB bf16), warm page cache")
    print(table(["type", "warm s", "peak RSS MiB", "file GB"], rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/qgc")
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / ".bench" / "qlora" / "smollm2"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--types", default="iq2_xxs,q8_0,q6_k")
    ap.add_argument("--profile", default="q8_0")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--io-gb", type=float, default=2.0)
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    import torch

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    header = ["check", "weights", "identical blocks", "blocks", "identical"]
    rows = _step("byte checks on the GPU", check_bytes)
    if rows:
        print(table(header, rows), flush=True)
    _step("kernel timings", time_kernels, args.repeats)
    rows = _step("byte checks against the C quantizers", check_cpu)
    if rows:
        print(table(header, rows), flush=True)
    if not args.skip_e2e:
        _step("end to end", end_to_end, args)


if __name__ == "__main__":
    main()
