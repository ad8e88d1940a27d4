"""llama.cpp's own ``llama-quantize`` on SmolLM2: the per-tensor types of its files for the low-bit mixes, the
reference the mix rules of :mod:`quantforge.presets` are checked against.

``benchmarks/llama_mix_types.py`` writes the table these functions produce to ``tests/data`` (CI has no
``llama-quantize``); ``tests/test_llama_mix_types.py`` checks our rules against that table, and against a fresh
``llama-quantize`` run where the binary exists. Nothing runs at import time.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
LLAMA_QUANTIZE = ROOT / ".bench" / "llama-build" / "bin" / "llama-quantize"
TABLE = ROOT / "tests" / "data" / "llama_quantize_smollm2_types.json"
#: Mix -> llama.cpp's LLAMA_FTYPE value (its ``llama-quantize`` type argument).
FTYPES = {"iq1_s": 24, "iq1_m": 31, "iq2_xxs": 19, "iq2_xs": 20, "iq2_s": 28, "iq2_m": 29, "iq3_xxs": 23,
          "iq3_xs": 22, "iq3_s": 26, "iq3_m": 27, "q2_k_s": 21, "tq1_0": 36, "tq2_0": 37}


def smollm2_imatrix(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A log-normal imatrix GGUF (llama.cpp's layout) with an entry for every 2-D weight but the token embedding,
    as ``llama-imatrix`` writes one; the values only matter for the bytes, not for the composition."""
    import numpy as np
    from safetensors import safe_open

    from quantforge.arch import arch_for, gguf_name
    from quantforge.imatrix import Imatrix, ImatrixEntry, save_imatrix_gguf

    spec = arch_for("llama")
    rng = np.random.default_rng(seed)
    entries = {}
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for key in sorted(f.keys()):
            shape = f.get_slice(key).get_shape()
            name = gguf_name(spec, key)
            if len(shape) == 2 and name and name != "token_embd.weight":
                entries[name] = ImatrixEntry(rng.lognormal(0.0, 1.0, (1, shape[1])).astype(np.float32) * 64,
                                             np.array([64.0], np.float32))
    save_imatrix_gguf(Imatrix(entries, ["random"], 1, 512), out)
    return out


def run_llama_quantize(src_gguf: Path, out: Path, mix: str, imatrix: Path | None, threads: int = 2) -> Path:
    """``llama-quantize [--imatrix F] SRC OUT FTYPE THREADS``; raises with llama.cpp's log on failure."""
    cmd = [str(LLAMA_QUANTIZE)] + (["--imatrix", str(imatrix)] if imatrix else [])
    cmd += [str(src_gguf), str(out), str(FTYPES[mix]), str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return out


_DRY_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*\], type =\s*(\S+),(?:.*->.*\((\S+)\))?")
_NEEDS_IMATRIX = "will require an imatrix"


def dry_run_types(src_gguf: Path, mix: str, imatrix: Path | None) -> tuple[dict[str, str], bool]:
    """``llama-quantize --dry-run``: the type llama.cpp picks for every tensor (name -> type, lower case) and
    whether it would refuse to make the file without an imatrix (always False when one is given)."""
    cmd = [str(LLAMA_QUANTIZE), "--dry-run"] + (["--imatrix", str(imatrix)] if imatrix else [])
    cmd += [str(src_gguf), str(src_gguf.with_suffix(".dry.gguf")), str(FTYPES[mix]), "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    types = {}
    for line in (done.stdout + done.stderr).splitlines():
        m = _DRY_LINE.match(line)
        if m:
            types[m.group(1)] = (m.group(3) or m.group(2)).lower()
    if not types:
        raise RuntimeError(f"no tensor lines in the output of {' '.join(cmd)}")
    return types, _NEEDS_IMATRIX in done.stdout + done.stderr


def gguf_types(path: Path) -> dict[str, str]:
    """Tensor name -> type name (lower case) of a GGUF file."""
    import gguf

    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(path)).tensors}


def gguf_tensor_bytes(path: Path) -> dict[str, bytes]:
    """Tensor name -> raw bytes of a GGUF file."""
    import gguf

    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


def compact(types: dict[str, str], fixed: dict[str, str]) -> dict[str, Any]:
    """``{"default": most common type, "other": {type: [names]}}`` over the tensors not in ``fixed`` (the
    tensors no mix re-types, stored once): a small, exact form of a composition."""
    counts: dict[str, int] = {}
    for n, t in types.items():
        if n not in fixed:
            counts[t] = counts.get(t, 0) + 1
    default = max(sorted(counts), key=lambda t: counts[t])
    other: dict[str, list[str]] = {}
    for n, t in types.items():
        if n not in fixed and t != default:
            other.setdefault(t, []).append(n)
    return {"default": default, "other": dict(sorted(other.items()))}


def expand(entry: dict[str, Any], table: dict[str, Any]) -> dict[str, str]:
    """The inverse of :func:`compact`: name -> type for every tensor of ``table``."""
    by_name = {n: t for t, names in entry["other"].items() for n in names}
    return {n: table["fixed"].get(n) or by_name.get(n, entry["default"]) for n in table["tensors"]}


def load_table() -> dict[str, Any]:
    return json.loads(TABLE.read_text(encoding="utf-8"))
