"""First-use cost of the GPU quantize kernels: each GGUF type's ``quantize`` of a random CUDA weight (``--shape``, 256 x
4096 by default), with and without an imatrix, in a process whose Triton cache starts empty. The first call pays the
kernel's compile and load; the later ones (``--repeats``, the fastest shown) do not. ``--baseline FILE`` also times
the Q4_K/Q5_K kernels of another revision's ``kernels/k45.py`` (``git show REV:kernels/k45.py > FILE``) in a process
of its own, and the script checks that every GPU encode gives the host C kernels' bytes (and the baseline's, where it
ran).

    python benchmarks/compile_time.py [--types q4_k,q5_k] [--shape 14336x4096] [--repeats 5]
        [--baseline .bench/k45-REV.py]

A kernel measurement: the weights are made on the host and copied to the GPU. The CLI pays each compile once per
machine (Triton keeps its cache in ``~/.triton``); a first ``quantize --imatrix`` on a fresh machine pays those of
its mix's types.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402


def _inputs(shape: tuple[int, int]):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g) * 0.02, torch.rand(shape[1], generator=g) + 0.1


def _codec(name: str, baseline: str | None):
    """``name``'s registry format, or the Q4_K/Q5_K codec of the baseline file."""
    from quantforge.formats import get_format

    if baseline is None:
        return get_format(name)
    spec = importlib.util.spec_from_file_location("quantforge.kernels._k45_baseline", baseline)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return {"q4_k": mod.Q4_K, "q5_k": mod.Q5_K}[name]


def child(types: list[str], baseline: str | None, out_dir: Path, shape: tuple[int, int], repeats: int) -> None:
    """Time each (type, imatrix) encode's first call and the fastest of ``repeats`` later ones; save the bytes;
    print one JSON row per line."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _touch(p):
        tl.store(p, tl.load(p) + 1)

    w, im = _inputs(shape)
    wd, imd = w.cuda(), im.cuda()
    _touch[(1,)](torch.zeros(1, device="cuda"))  # Triton's own start-up (driver stubs), not a quantize kernel's
    torch.cuda.synchronize()
    from quantforge.formats import get_format

    for t in types:
        codec = _codec(t, baseline)
        for with_im in (False, True) if get_format(t).takes_imatrix else (False,):
            times = []
            try:
                for _ in range(1 + repeats):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    q = codec.quantize(wd, imd if with_im else None)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            except Exception as e:  # a type that refuses to run without an imatrix
                print(json.dumps({"type": t, "imatrix": with_im, "error": type(e).__name__}), flush=True)
                continue
            torch.save(q.cpu(), out_dir / f"{'base' if baseline else 'cur'}-{t}-{int(with_im)}.pt")
            print(json.dumps({"type": t, "imatrix": with_im, "first": times[0], "second": min(times[1:])}), flush=True)


def _run_child(types: list[str], baseline: str | None, out_dir: Path, shape: str,
               repeats: int) -> dict[tuple[str, bool], dict]:
    cache = tempfile.mkdtemp(prefix="triton-compile-time-")
    cmd = [sys.executable, "-P", __file__, "--child", "--types", ",".join(types), "--out", str(out_dir),
           "--shape", shape, "--repeats", str(repeats)]
    if baseline:
        cmd += ["--baseline", baseline]
    try:
        res = subprocess.run(cmd, env={**os.environ, "TRITON_CACHE_DIR": cache}, capture_output=True, text=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if res.returncode:
        raise SystemExit(f"child failed:\n{res.stderr[-4000:]}")
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return {(r["type"], r["imatrix"]): r for r in rows}


def main() -> None:
    from quantforge.formats import FORMATS, Family

    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="")
    ap.add_argument("--baseline", default=None, help="a kernels/k45.py of another revision (Q4_K, Q5_K)")
    ap.add_argument("--shape", default="256x4096", help="rows x columns of the weight")
    ap.add_argument("--repeats", type=int, default=1, help="later calls timed (the fastest is shown)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = list(dict.fromkeys(f.name for f in FORMATS.values() if f.family is Family.GGUF and f.block_size > 1))
    types = [t for t in args.types.split(",") if t] or names
    shape = tuple(int(v) for v in args.shape.split("x"))
    if args.child:
        child(types, args.baseline, Path(args.out), shape, args.repeats)
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("compile_time.py needs a CUDA device")
    from quantforge.formats import get_format

    out_dir = Path(tempfile.mkdtemp(prefix="compile-time-"))
    cur = _run_child(types, None, out_dir, args.shape, args.repeats)
    base_types = [t for t in types if t in ("q4_k", "q5_k")]
    base = {}
    if args.baseline and base_types:
        base = _run_child(base_types, args.baseline, out_dir, args.shape, args.repeats)
    w, im = _inputs(shape)
    rows, same = [], True
    for t in types:
        for with_im in (False, True) if get_format(t).takes_imatrix else (False,):
            r = cur[(t, with_im)]
            if "error" in r:
                rows.append([t, "yes" if with_im else "no", f"refused ({r['error']})", "-", "-", "-"])
                continue
            got = torch.load(out_dir / f"cur-{t}-{int(with_im)}.pt")
            ok = torch.equal(got, get_format(t).quantize(w, im if with_im else None))
            cells = [f"{r['first']:.3f}", f"{r['second']:.3f}"]
            b = base.get((t, with_im))
            if b is not None:
                ok &= torch.equal(got, torch.load(out_dir / f"base-{t}-{int(with_im)}.pt"))
                cells.append(f"{b['first']:.3f} / {b['second']:.3f}")
            else:
                cells.append("-")
            same &= ok
            rows.append([t, "yes" if with_im else "no", *cells, "yes" if ok else "NO"])
    shutil.rmtree(out_dir, ignore_errors=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; {shape[0]} x {shape[1]} weights, seconds, "
          "each process starting with an empty Triton cache"
          + (f"; baseline kernels: {args.baseline}" if args.baseline else ""))
    later = "second call" if args.repeats == 1 else f"later calls (min of {args.repeats})"
    print(table(["type", "imatrix", "first call", later, f"baseline first / {later}", "same bytes"], rows))
    also = " and the baseline's" if base else ""
    print(f"every GPU encode gives the host C kernels' bytes{also}: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
