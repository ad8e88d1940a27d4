"""Kernel launches per block of the optimized rounding modes, counted on the CPU: what bounds them on a GPU.

The error-feedback (``gptq``) and tuned (``tune``) roundings walk a weight's columns in order, so on a GPU their
time is set by how many kernels each block of columns launches, not by arithmetic. This script counts, with a
``TorchDispatchMode``, the PyTorch ops that launch a kernel on a GPU (views, ``detach`` and allocations left out)
while ``gptq_rows`` / ``tune_rows`` run on a random 256 x 1024 layer with correlated inputs, in three
configurations of the same code:

* everything in PyTorch (the codec's vectorized reference, the columns as a loop of tensor ops);
* the column loops as one Triton launch each (``kernels/feedback.py``, ``kernels/code_sweep.py``), the codec in
  PyTorch;
* the codec's quantize as one Triton launch too (``kernels/k45.py``, ``kernels/q6_k.py``, ``kernels/q8_0.py``):
  the CUDA path.

A kernel stands in as one launch by running outside the counting mode (its work is done by the CPU code it
matches bit for bit). These are counts, not times; at roughly 5-10 us per launch they give the GPU's floor.

    python benchmarks/rounding_launches.py [--types q4_k,q6_k,q8_0]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402

NO_LAUNCH = {"aten.view", "aten.slice", "aten.select", "aten.unsqueeze", "aten.detach", "aten.t", "aten.expand",
             "aten._unsafe_view", "aten.alias", "aten.squeeze", "aten.permute", "aten.transpose", "aten.reshape",
             "aten.as_strided", "aten.split", "aten.unbind", "aten.lift_fresh", "aten.empty", "aten.empty_like",
             "aten.empty_strided"}
"""Ops that only make a view or allocate: no kernel on a GPU."""


def counted(fn, *args, **kwargs) -> tuple[object, int]:
    """``fn(*args)`` and the number of launching ops it dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with Count() as c:
        out = fn(*args, **kwargs)
    return out, sum(v for k, v in c.n.items() if k not in NO_LAUNCH)


def one_launch(fn):
    """``fn`` run outside the counting mode, counted as one launch."""
    from torch.utils._python_dispatch import _disable_current_modes

    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        with _disable_current_modes():
            return fn(*args, **kwargs)

    wrapped.calls = calls
    return wrapped


@contextlib.contextmanager
def configuration(loops: bool, codec: bool):
    """Patch the rounders so the column loops (``loops``) and the codec's quantize (``codec``) count as one
    launch each; otherwise they run in PyTorch inside the count (the codec's vectorized reference)."""
    from quantforge.formats import QuantFormat
    from quantforge.rounding import gptq, tune

    saved = (gptq.feedback_block, tune.sweep_codes, QuantFormat.quantize, os.environ.get("QUANTFORGE_CPU_KERNELS"))
    fb, sweep = one_launch(gptq.feedback_block), one_launch(tune.sweep_codes)
    if loops:
        gptq.feedback_block, tune.sweep_codes = fb, sweep
    if codec:
        QuantFormat.quantize = one_launch(saved[2])
    else:
        os.environ["QUANTFORGE_CPU_KERNELS"] = "torch"  # the codec's PyTorch reference, not the C kernels
    extra = [fb.calls, sweep.calls, getattr(QuantFormat.quantize, "calls", [0])]
    try:
        yield extra
    finally:
        gptq.feedback_block, tune.sweep_codes, QuantFormat.quantize = saved[:3]
        if saved[3] is None:
            os.environ.pop("QUANTFORGE_CPU_KERNELS", None)
        else:
            os.environ["QUANTFORGE_CPU_KERNELS"] = saved[3]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default="q4_k,q6_k,q8_0")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=1024)
    args = ap.parse_args()
    import torch

    from quantforge.formats import get_format
    from quantforge.rounding import gptq, tune

    torch.set_num_threads(1)
    rows = []
    for name in [t for t in args.types.split(",") if t]:
        fmt = get_format(name)
        g = torch.Generator().manual_seed(0)
        n = args.cols
        x = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
        h = x.t() @ x / x.shape[0]
        w = torch.randn(args.rows, n, generator=g) * 0.02
        im = (x * x).mean(dim=0)
        factor = gptq.inverse_factor(h)
        blocks = n // fmt.block_size
        start = fmt.quantize(w, im if fmt.takes_imatrix else None)
        per_mode: dict[str, list[float]] = {"gptq": [], "tune": []}
        outputs: dict[str, list[torch.Tensor]] = {"gptq": [], "tune": []}
        for loops, codec in ((False, False), (True, False), (True, True)):
            with configuration(loops, codec):
                out, ops = counted(gptq.gptq_rows, w, fmt, factor, im)
                per_mode["gptq"].append(ops / blocks)
                outputs["gptq"].append(out)
                out, ops = counted(tune.tune_rows, w, fmt, h, start)
                per_mode["tune"].append(ops / blocks)
                outputs["tune"].append(out)
        for mode, counts in per_mode.items():
            same = all(torch.equal(o, outputs[mode][0]) for o in outputs[mode])
            rows.append([name, mode, fmt.block_size, round(counts[0]), round(counts[1]), round(counts[2]),
                         round(counts[0] / counts[2], 1), "yes" if same else "NO"])
            print(rows[-1], flush=True)
    print(f"\n{args.rows} x {args.cols} layer, launching PyTorch ops per block of columns (counted on the CPU; "
          f"torch {torch.__version__})")
    print(table(["type", "mode", "block columns", "all PyTorch", "column loops as kernels",
                 "loops and codec as kernels (CUDA path)", "ratio", "same bytes in all three"], rows))


if __name__ == "__main__":
    main()
