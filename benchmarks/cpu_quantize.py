"""CPU whole-model quantize speed: quantforge vs llama.cpp's ``llama_model_quantize``, same machine, 2 threads
(llama.cpp's own quantizer as the anchor). SmolLM2-135M (plain) to q4_k_m, q3_k_m, q2_k and iq4_xs, no imatrix.

    python benchmarks/cpu_quantize.py [--repeats 3] [--mixes q4_k_m,q3_k_m,q2_k,iq4_xs] [--record]

* ours: ``export_gguf`` from the bf16 checkpoint (safetensors) in a fresh ``python`` process with
  ``torch.set_num_threads(2)``; the CPU codecs run the C kernels of ``kernels/_cquant.c`` (built at install time,
  opened with ctypes by ``kernels/_cpu_fast.py``: nothing is compiled at run time). The first run of each mix is
  reported apart from the warm runs (it may see cold file caches).
* llama.cpp: ``llama_model_quantize`` (llama-cpp-python's libllama, ``nthread=2``) on our f16 GGUF of the same
  checkpoint, also in a fresh process.

Each process reports the time of the call itself (``export_gguf`` / ``llama_model_quantize``) besides the process
wall time (interpreter start and imports included: ``import torch`` for ours). Warm runs of ours and llama.cpp
alternate (ours, llama.cpp, ours, llama.cpp, ...) and the table gives the minimum of each side, because the
machine may be shared with other jobs. The headline ratio is call vs call; the goal is a ratio <= 1.0 per mix.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import record, table  # noqa: E402

MIXES = {"q4_k_m": 15, "q3_k_m": 12, "q2_k": 10, "iq4_xs": 30}  # name -> LLAMA_FTYPE
SECTION = "CPU quantize vs llama_model_quantize"
DEVICE = "AMD EPYC, 2 cores (no GPU); 2 threads each side"

OURS = """
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(2)
from quantforge import formats
from quantforge.exporters.gguf import export_gguf
t1 = time.perf_counter()
spent = [0.0]
_quantize = formats.QuantFormat.quantize
def timed(self, weight, imatrix=None):  # instrumentation only: time spent in the codecs
    t = time.perf_counter()
    out = _quantize(self, weight, imatrix)
    spent[0] += time.perf_counter() - t
    return out
formats.QuantFormat.quantize = timed
export_gguf(sys.argv[1], sys.argv[2], qtype=sys.argv[3], force=True)
t2 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "call": t2 - t1, "quantize": spent[0]}))
"""

LLAMA = """
import json, os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[4])
from helpers.reference import quantize_with_llama_cpp
import llama_cpp
t1 = time.perf_counter()
quantize_with_llama_cpp(sys.argv[1], sys.argv[2], int(sys.argv[3]))
t2 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "call": t2 - t1}))
"""
TESTS = Path(__file__).resolve().parents[1] / "tests"  # the llama.cpp reference helpers live with the tests


def run(code: str, args: list[str], env: dict[str, str]) -> dict[str, float]:
    """One fresh process: its wall time plus the phases it printed (llama.cpp's log goes to /dev/null)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-P", "-c", code, *args], env={**os.environ, **env}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall"] = wall
    return out


def identical_tensors(ours: Path, theirs: Path) -> tuple[int, int]:
    """How many tensors of ``ours`` have the same type and bytes as in ``theirs``, out of how many."""
    import gguf
    import numpy as np

    other = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    tensors = gguf.GGUFReader(str(ours)).tensors
    same = sum(t.name in other and t.tensor_type == other[t.name].tensor_type
               and np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(other[t.name].data).view(np.uint8))
               for t in tensors)
    return same, len(tensors)


def compiler_version() -> str:
    """The first line of ``$CC --version`` for the compiler setuptools builds the C kernels with."""
    import sysconfig

    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return cc
    return out.splitlines()[0] if out else cc


def verdict(ratios: dict[str, float]) -> str:
    """The goal line: every mix's warm call ratio ours/llama.cpp at most 1.0."""
    missed = [f"{m} ({r:.2f})" for m, r in ratios.items() if r > 1.0]
    if not missed:
        return "Goal (ratio <= 1.0 for every mix, warm call vs call): **met**."
    return f"Goal (ratio <= 1.0 for every mix, warm call vs call): **not met** for {', '.join(missed)}."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3, help="warm runs of each side per mix (at least 3)")
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.repeats < 3:
        ap.error("--repeats must be at least 3 (the table reports minimums of alternating runs)")

    import torch
    from quantforge.exporters.gguf import export_gguf

    from quantforge import fixtures

    torch.set_num_threads(2)
    load_start = os.getloadavg()[0]
    model = str(fixtures.smollm2("plain"))
    rows = []
    notes = []
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        f16 = Path(tmp) / "smollm2-f16.gguf"
        export_gguf(model, f16, qtype="f16")
        for mix in args.mixes.split(","):
            ours_out, llama_out = Path(tmp) / f"ours-{mix}.gguf", Path(tmp) / f"llama-{mix}.gguf"
            cold = run(OURS, [model, str(ours_out), mix], {})
            ours, llama = [], []
            for _ in range(args.repeats):
                ours.append(run(OURS, [model, str(ours_out), mix], {}))
                llama.append(run(LLAMA, [str(f16), str(llama_out), str(MIXES[mix]), str(TESTS)], {}))

            def low(runs: list[dict[str, float]], key: str) -> float:
                return min(r[key] for r in runs)

            same, count = identical_tensors(ours_out, llama_out)
            size_ratio = ours_out.stat().st_size / llama_out.stat().st_size
            ours_calls = ", ".join("%.2f" % r["call"] for r in ours)
            llama_calls = ", ".join("%.2f" % r["call"] for r in llama)
            notes.append(f"{mix}: {same}/{count} tensors byte-identical (type and data) to llama.cpp's file; "
                         f"file size ratio {size_ratio:.4f}; ours warm calls {ours_calls} s; llama.cpp calls "
                         f"{llama_calls} s")
            ratio = low(ours, "call") / low(llama, "call")
            rows.append([mix, cold["call"], low(ours, "call"), low(ours, "quantize"), low(llama, "call"), ratio,
                         cold["wall"], low(ours, "wall"), low(llama, "wall"), low(ours, "wall") / low(llama, "wall")])
            ratios[mix] = ratio
            print(rows[-1], flush=True)  # noqa: T201
    body = table(["mix", "ours first run s", "ours warm s (min)", "of which in codecs s (min)",
                  "llama.cpp s (min)", "ratio ours/llama.cpp", "ours first process s", "ours warm process s (min)",
                  "llama.cpp process s (min)", "process ratio"], rows)
    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    load = f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    body = (f"SmolLM2-135M-Instruct (plain), no imatrix; ours from the bf16 safetensors, llama.cpp from our f16 GGUF; "
            f"2 threads each; minimum of {args.repeats} alternating warm runs per side (ours, llama.cpp, ours, ...); "
            f"`date`: {date}; {load} (shared machine); torch {torch.__version__}, C kernels of `kernels/_cquant.c` "
            f"built with {compiler_version()}.\n\n{body}\n\n"
            "\"s\" columns time the call (`export_gguf` / `llama_model_quantize`); \"of which in codecs\" is the "
            "part of our warm call spent in `QuantFormat.quantize` (the C kernels plus their wrappers), the rest "
            "is the exporter (reading, bf16 -> f32, finiteness check, Q/K permutation, metadata, writing); "
            "\"process\" columns time the whole fresh process (interpreter start and imports included).\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n\n" + verdict(ratios))
    print(body)  # noqa: T201
    if args.record:
        command = "python benchmarks/cpu_quantize.py --record" + (
            f" --repeats {args.repeats}" if args.repeats != 3 else "") + (
            f" --mixes {args.mixes}" if args.mixes != ",".join(MIXES) else "")
        record(SECTION, command, DEVICE, body)


if __name__ == "__main__":
    main()
