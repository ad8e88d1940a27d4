"""Identity of an evaluated artifact: name, format, quant type or plan, size on disk and bits per weight."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..inspect import Report, TensorRow, describe, mix_label
from .engines import artifact_kind

FORMAT_NAMES = {"gguf": "gguf", "bnb4": "bnb4", "checkpoint": "hf"}
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
PLAN_KEY = "quantforge.plan"
PLAN_FILES = ("quantforge_plan.json", "plan.json")


def gguf_type(metadata: dict[str, Any]) -> str | None:
    """``general.file_type`` as a preset name (``15`` -> ``q4_k_m``)."""
    import gguf

    value = metadata.get("general.file_type")
    if value is None:
        return None
    try:
        name = gguf.LlamaFileType(int(value)).name.lower()
    except ValueError:
        return f"file_type_{value}"
    for prefix in ("mostly_", "all_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir()
               if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt"))


def _folder_plan(folder: Path) -> Any:
    for name in PLAN_FILES:
        f = folder / name
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError:
                return name
    return None


def _gguf_report(path: Path) -> Report:
    """What :func:`quantforge.inspect.describe` reports of a GGUF for this purpose (types, shapes, bytes, scalar
    metadata), read from the header without decoding the vocabulary arrays (seconds of Python for 50k tokens)."""
    import gguf

    from ..gguf_reader import ArrayValue, read_header

    meta, tensors = read_header(path)
    rows = [TensorRow(t.name, gguf.GGMLQuantizationType(t.type_id).name.lower(), t.shape, t.nbytes) for t in tensors]
    return Report(str(path), "gguf", {k: str(v) if isinstance(v, ArrayValue) else v for k, v in meta.items()}, rows)


def describe_artifact(path: str | os.PathLike[str], n_weights: int | None = None) -> dict[str, Any]:
    """``name``, ``path``, ``format``, ``type``, ``plan``, ``size_bytes`` and ``bpw`` of an artifact.

    ``n_weights`` overrides the weight count behind ``bpw`` (bitsandbytes stores two 4-bit codes per element,
    so its tensor shapes undercount the weights; the loaded model knows the real count)."""
    p = Path(path)
    kind = artifact_kind(p)
    report = _gguf_report(p) if kind == "gguf" else describe(p)
    params = n_weights or report.total_params
    bpw = 8.0 * report.total_bytes / max(params, 1)
    plan = None
    if kind == "gguf":
        qtype = mix_label(report) or gguf_type(report.metadata)
        size = p.stat().st_size
        plan = report.metadata.get(PLAN_KEY)
    else:
        config = json.loads((p / "config.json").read_text())
        size = _folder_bytes(p)
        plan = _folder_plan(p)
        if kind == "bnb4":
            qcfg = config.get("quantization_config") or {}
            qtype = qcfg.get("bnb_4bit_quant_type", "nf4")
            if qcfg.get("bnb_4bit_use_double_quant"):
                qtype += "+dq"
        else:
            dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
            qtype = DTYPE_NAMES.get(dtype, dtype or None)
    return {
        "name": p.name, "path": str(p), "format": FORMAT_NAMES[kind], "type": qtype, "plan": plan,
        "size_bytes": int(size), "bpw": round(bpw, 4),
    }
