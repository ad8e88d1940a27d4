"""llama.cpp's per-tensor composition of the low-bit mixes on SmolLM2, written as the test fixture
``tests/data/llama_quantize_smollm2_types.json``, and (``--bytes``) a byte-for-byte comparison of whole files.

    python benchmarks/llama_mix_types.py [--bytes MIX,MIX|all] [--record]

Needs ``.bench/llama-build/bin/llama-quantize`` (``benchmarks/build_llama_cpp.sh``). SmolLM2-135M-Instruct (plain
fixture) is exported by quantforge to an f16 GGUF (every bf16 weight of this model is exact in f16), and
``llama-quantize --dry-run`` reports the type it picks for each tensor of each mix, with a log-normal imatrix
(every 2-D weight but the token embedding, fixed seed) and without one, and whether it would refuse the mix
without an imatrix. The table stores, per mix and case, the most common type and the tensors that differ from it.

``--bytes``: for each named mix, ``llama-quantize`` (2 threads) makes the real file from the f16 GGUF with that
imatrix, ``quantforge quantize`` makes ours from the safetensors with the same imatrix; the script prints how many
tensors have the same type and identical bytes, and checks that llama-cpp-python loads and runs both files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import device_line, record, table  # noqa: E402
from helpers import llama_mixes as lm  # noqa: E402
from helpers.reference import llama_cpp_logits  # noqa: E402

SECTION = "Low-bit mixes: per-tensor types and bytes vs llama-quantize (SmolLM2)"
PROMPT = [1, 504, 3458, 282, 5168, 314]


def build_table(f16: Path, imatrix: Path) -> dict:
    cases = {}
    for mix in lm.FTYPES:
        with_im, _ = lm.dry_run_types(f16, mix, imatrix)
        without, refused = lm.dry_run_types(f16, mix, None)
        cases[mix] = (with_im, without, refused)
    tensors = list(next(iter(cases.values()))[0])
    fixed = {n: t for n, t in cases["q2_k_s"][0].items()
             if all(c[0][n] == t and c[1][n] == t for c in cases.values())}
    return {"source": "llama-quantize --dry-run (llama.cpp vendored by llama-cpp-python 0.3.36) on "
                      "SmolLM2-135M-Instruct exported to f16 by quantforge; written by benchmarks/llama_mix_types.py",
            "tensors": tensors, "fixed": fixed,
            "mixes": {mix: {"imatrix": lm.compact(w, fixed), "no_imatrix": lm.compact(wo, fixed),
                            "no_imatrix_refused": r} for mix, (w, wo, r) in cases.items()}}


def dump(data: dict) -> str:
    """JSON with one line per tensor list and per mix case (diff-friendly, small)."""
    lines = ["{", f' "source": {json.dumps(data["source"])},', f' "tensors": {json.dumps(data["tensors"])},',
             f' "fixed": {json.dumps(data["fixed"])},', ' "mixes": {']
    mixes = list(data["mixes"].items())
    for i, (mix, cases) in enumerate(mixes):
        lines.append(f"  {json.dumps(mix)}: {{")
        items = list(cases.items())
        for j, (k, v) in enumerate(items):
            lines.append(f"   {json.dumps(k)}: {json.dumps(v)}" + ("," if j < len(items) - 1 else ""))
        lines.append("  }" + ("," if i < len(mixes) - 1 else ""))
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


def compare_bytes(mixes: list[str], model: Path, f16: Path, imatrix: Path, tmp: Path) -> list[list[object]]:
    from quantforge.exporters.gguf import export_gguf

    rows = []
    for mix in mixes:
        t0 = time.perf_counter()
        theirs = lm.run_llama_quantize(f16, tmp / f"llama-{mix}.gguf", mix, imatrix)
        t1 = time.perf_counter()
        ours = export_gguf(model, tmp / f"ours-{mix}.gguf", qtype=mix, imatrix=imatrix)
        t2 = time.perf_counter()
        tt, to = lm.gguf_types(theirs), lm.gguf_types(ours)
        bt, bo = lm.gguf_tensor_bytes(theirs), lm.gguf_tensor_bytes(ours)
        same_type = sum(tt[n] == to.get(n) for n in tt)
        same_bytes = sum(bt[n] == bo.get(n) for n in bt)
        runs = all(bool(llama_cpp_logits(p, PROMPT, n_ctx=64).isfinite().all()) for p in (theirs, ours))
        rows.append([mix, f"{same_type}/{len(tt)}", f"{same_bytes}/{len(bt)}", theirs.stat().st_size,
                     ours.stat().st_size, "yes" if runs else "NO", t1 - t0, t2 - t1])
        print(rows[-1], flush=True)  # noqa: T201
        theirs.unlink()
        ours.unlink()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", default="", help="mixes to compare byte for byte (comma list, or 'all')")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    if not lm.LLAMA_QUANTIZE.exists():
        sys.exit(f"{lm.LLAMA_QUANTIZE} is missing; build it with benchmarks/build_llama_cpp.sh")
    from quantforge.exporters.gguf import export_gguf

    from quantforge import fixtures

    model = fixtures.smollm2("plain")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        f16 = export_gguf(model, tmp / "smollm2-f16.gguf", qtype="f16")
        imatrix = lm.smollm2_imatrix(model, tmp / "imatrix.gguf")
        data = build_table(f16, imatrix)
        lm.TABLE.write_text(dump(data), encoding="utf-8")
        if json.loads(dump(data)) != data:
            raise RuntimeError("the table does not read back")
        print(f"wrote {lm.TABLE} ({lm.TABLE.stat().st_size} bytes)")  # noqa: T201
        mixes = list(lm.FTYPES) if args.bytes == "all" else [m for m in args.bytes.split(",") if m]
        if not mixes:
            return
        rows = compare_bytes(mixes, model, f16, imatrix, tmp)
    body = (f"SmolLM2-135M-Instruct (plain), log-normal imatrix; llama-quantize from quantforge's f16 GGUF, 2 "
            f"threads; ours `quantforge quantize --imatrix` from the safetensors; `date`: "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.\n\n"
            + table(["mix", "same type", "identical bytes", "llama.cpp file bytes", "our file bytes",
                     "both run in llama-cpp-python", "llama-quantize s", "ours s"], rows) + "\n")
    print(body)  # noqa: T201
    if args.record:
        record(SECTION, "python benchmarks/llama_mix_types.py " + " ".join(sys.argv[1:]), device_line(), body)


if __name__ == "__main__":
    main()
