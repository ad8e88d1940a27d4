"""Imatrix-weighted quantization error per type: quantforge (``export_gguf --imatrix``) vs llama.cpp's
``llama-quantize --imatrix`` (built from the vendored llama.cpp in .bench/), same imatrix, same tensors.

    python benchmarks/imatrix_error.py [--variant dithered] [--chunks 16] [--record]

The imatrix comes from ``llama-imatrix`` on WikiText-2 valid, in both the GGUF and the legacy .dat forms, and
each form is fed to both quantizers. Error = sum over weights of imatrix[col] * (w - dequant(w))^2 against the
f16 weights in the file both quantize from.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LLAMA_BIN, device_line, record, table  # noqa: E402

PURE = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q2_k": "Q2_K", "q3_k": "Q3_K_S",
        "q4_k": "Q4_K_S", "q5_k": "Q5_K_S", "q6_k": "Q6_K", "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="dithered")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    import gguf
    import numpy as np
    import torch

    from quantforge import fixtures
    from quantforge.imatrix import load_imatrix
    from quantforge.exporters.gguf import export_gguf
    from quantforge.formats import get_format
    from quantforge.plan import Plan, TensorChoice, save_plan

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "wiki.valid.raw"
    ckpt = fixtures.smollm2(args.variant)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        f16 = export_gguf(ckpt, t / "f16.gguf", qtype="f16")
        imats = {}
        for form in ("gguf", "dat"):
            out = t / f"imatrix.{form}"
            subprocess.run([str(LLAMA_BIN / "llama-imatrix"), "-m", str(f16), "-f", str(data), "-o", str(out),
                            "--output-format", form, "--chunks", str(args.chunks), "-t", "2", "--no-ppl"],
                           check=True, capture_output=True)
            imats[form] = out
        weights = {x.name: np.array(x.data, dtype=np.float32) for x in gguf.GGUFReader(str(f16)).tensors
                   if x.tensor_type.name == "F16"}
        for form, imat_path in imats.items():
            imat = load_imatrix(imat_path)
            for name, ltype in PURE.items():
                theirs_path = t / f"llama-{name}-{form}.gguf"
                subprocess.run([str(LLAMA_BIN / "llama-quantize"), "--pure", "--imatrix", str(imat_path), str(f16),
                                str(theirs_path), ltype, "2"], check=True, capture_output=True)
                theirs = {x.name: x for x in gguf.GGUFReader(str(theirs_path)).tensors
                          if x.tensor_type.name.lower() == name and imat.for_tensor(x.name) is not None}
                plan = Plan(target="gguf", base_type="f16",
                            tensors={n: TensorChoice(name) for n in theirs})
                save_plan(plan, t / "plan.yaml", force=True)
                ours_path = export_gguf(ckpt, t / f"ours-{name}-{form}.gguf", qtype="f16", imatrix=imat_path,
                                        plan=t / "plan.yaml", force=True)
                ours = {x.name: x for x in gguf.GGUFReader(str(ours_path)).tensors}
                ratios, same = [], 0
                fmt = get_format(name)
                for n, x in theirs.items():
                    w = torch.from_numpy(weights[n]).double()
                    q = torch.from_numpy(imat.for_tensor(n)).double()
                    d_t = torch.from_numpy(gguf.quants.dequantize(np.array(x.data), x.tensor_type)).double()
                    d_o = fmt.dequantize(torch.from_numpy(np.array(ours[n].data))).double().reshape(w.shape)
                    e_t = float((q * (w - d_t.reshape(w.shape)) ** 2).sum())
                    e_o = float((q * (w - d_o) ** 2).sum())
                    ratios.append(e_o / e_t if e_t > 0 else 1.0)
                    same += int(np.array_equal(np.array(x.data), np.array(ours[n].data)))
                rows.append([name, form, len(theirs), sum(ratios) / len(ratios), max(ratios),
                             f"{same}/{len(theirs)}"])
                print(rows[-1], flush=True)
    body = table(["type", "imatrix form", "tensors", "mean error ratio (ours/llama.cpp)", "max ratio",
                  "byte-identical tensors"], rows)
    body += (f"\n\nSmolLM2 ({args.variant}); imatrix from llama-imatrix on wikitext-2 wiki.valid.raw, {args.chunks} "
             "chunks of 512; llama-quantize --pure per type (576-wide tensors fall back, only tensors of the "
             "named type are compared); goal: mean ratio <= 1.01.")
    print(body)
    if args.record:
        record("Imatrix-weighted error vs llama-quantize --imatrix",
               f"python benchmarks/imatrix_error.py --variant {args.variant} --chunks {args.chunks} --record",
               device_line(), body)


if __name__ == "__main__":
    main()
