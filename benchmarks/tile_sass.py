"""Instruction cost of the tile dequantizers inside the fused LoRA kernels, compiled for Hopper without a GPU.

Compiles ``kernels/lora_linear.py``'s fused forward and backward (bf16, rank 16) once per tile and block config for
sm_90 with Triton's bundled ``ptxas`` and counts the SASS of the reduction loop (one weight tile per iteration):
instructions per weight element per thread, global loads (``LDG``) and spill stores (``STL``). Also the
whole-tensor dequantize kernels the trainer's transient path runs. ``--baseline REV`` adds the tiles of
``kernels/tiles.py`` at git revision ``REV`` (e.g. ``HEAD``) for a before/after comparison.

Usage (any machine with Triton; no GPU needed)::

    python -P benchmarks/tile_sass.py --baseline HEAD
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
CONFIGS = ((16, 64, 128, 4), (32, 64, 128, 4), (64, 128, 64, 8), (16, 64, 64, 4))
TILES = ("bnb4_dq_tile", "q4_k_tile", "q5_k_tile", "q6_k_tile")
_LINE = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def sass(kernel) -> list[tuple[int, str, str]]:
    """(address, opcode, line) of every SASS instruction of a compiled kernel."""
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2), line) for line in text.splitlines() if (m := _LINE.match(line))]


def loop_body(ins: list[tuple[int, str, str]]) -> collections.Counter:
    """Opcode counts of the largest backward-branch loop (the reduction over K)."""
    best: collections.Counter = collections.Counter()
    for addr, op, line in ins:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", line) if op == "BRA" else None
        if m and int(m.group(1), 16) < addr:
            body = collections.Counter(o for a, o, _ in ins if int(m.group(1), 16) <= a <= addr)
            best = max(best, body, key=lambda c: sum(c.values()))
    return best


def fused(tile, bwd: bool, bm: int, bn: int, bk: int, warps: int):
    from quantforge.kernels import lora_linear as ll

    names = ("dy w aux a b dx g_out M N K stride_w R scale M_BUCKET" if bwd else
             "x lx w aux a b bias y xa_out M N K stride_w R scale M_BUCKET").split()
    types = {"w": "*u8", "aux": "*fp32", "scale": "fp32", "stride_w": "i64"}
    sig = {n: types.get(n, "i32" if n[0].isupper() or n == "R" else "*bf16") for n in names}
    consts = {"TILE": tile, "HAS_LORA": 1, "RP": 16, "PREC": "tf32", "UPCAST": 0, "BM": bm, "BN": bn, "BK": bk,
              "GROUP_M": 8, **({"ADD_LORA": 1} if bwd else {"SEP_LX": 0, "HAS_BIAS": 0})}
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=ll._bwd_kernel if bwd else ll._fwd_kernel, signature=sig, constexprs=consts)
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": 1, "enable_fp_fusion": False})


def whole_tensor(tiles_mod) -> list[tuple[str, float, int, int]]:
    sig = {"src": "*u8", "aux": "*fp32", "dst": "*bf16", "n_blocks": "i32"}
    cases = (("nf4 (double-quantized)", tiles_mod.bnb4_blocks_kernel, {"DQ": 1, "NB": 64}, 64 * 64),
             ("q4_k", tiles_mod.k45_blocks_kernel, {"FIVE_BIT": 0, "NB": 16}, 16 * 256),
             ("q6_k", tiles_mod.q6_k_blocks_kernel, {"NB": 16}, 16 * 256))
    out = []
    for name, fn, consts, elems in cases:
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
        ops = collections.Counter(o for _, o, _ in sass(triton.compile(
            src, target=TARGET, options={"num_warps": 4, "enable_fp_fusion": False})))
        out.append((name, sum(ops.values()) * 128 / elems, ops["LDG"], ops["STG"]))
    return out


def baseline_tiles(rev: str):
    """``kernels/tiles.py`` at git revision ``rev``, imported as a sibling module of ``quantforge.kernels``."""
    root = Path(__file__).resolve().parent.parent
    text = subprocess.run(["git", "show", f"{rev}:kernels/tiles.py"], cwd=root, capture_output=True, text=True,
                          check=True).stdout
    import quantforge.kernels as pkg

    path = Path(tempfile.mkdtemp()) / "_tiles_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"{pkg.__name__}._tiles_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=None, metavar="REV", help="also compile the tiles of this git revision")
    ap.add_argument("--tiles", nargs="+", default=list(TILES))
    args = ap.parse_args()
    from quantforge.kernels import tiles

    sources = [("now", tiles)] + ([(args.baseline, baseline_tiles(args.baseline))] if args.baseline else [])
    print(f"triton {triton.__version__}, target sm_90, bf16, rank 16, one stage")
    print("\n| tile | tiles.py | BM x BN x BK, warps | fwd instr/elem | fwd LDG | fwd STL | bwd instr/elem | bwd LDG "
          "| bwd STL |\n|---|---|---|---|---|---|---|---|---|")
    for name in args.tiles:
        for label, mod in sources:
            for bm, bn, bk, w in CONFIGS:
                cells = []
                for bwd in (False, True):
                    ops = loop_body(sass(fused(getattr(mod, name), bwd, bm, bn, bk, w)))
                    cells += [f"{sum(ops.values()) * 32 * w / (bn * bk):.1f}", str(ops["LDG"]), str(ops["STL"])]
                print(f"| {name} | {label} | {bm}x{bn}x{bk}, {w} | " + " | ".join(cells) + " |", flush=True)
    print("\n| whole-tensor dequantize | instr/elem | LDG | STG |\n|---|---|---|---|")
    for name, per, ldg, stg in whole_tensor(tiles):
        print(f"| {name} | {per:.1f} | {ldg} | {stg} |")
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
