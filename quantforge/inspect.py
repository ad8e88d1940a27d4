"""Describe an artifact: a GGUF file or a checkpoint folder (tensors, types, sizes, bits per weight, metadata)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CorruptCheckpoint, InputError


@dataclass
class TensorRow:
    name: str
    type: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def bpw(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)


@dataclass
class Report:
    path: str
    kind: str
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorRow] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def bpw(self) -> float:
        return 8.0 * self.total_bytes / max(self.total_params, 1)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        return dict(sorted(counts.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "kind": self.kind, "total_bytes": self.total_bytes, "params": self.total_params,
            "bpw": round(self.bpw, 4), "types": self.type_counts(), "metadata": self.metadata,
            "tensors": [{"name": t.name, "type": t.type, "shape": list(t.shape), "nbytes": t.nbytes} for t in self.tensors],
        }


def describe(path: str | os.PathLike[str]) -> Report:
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return describe_gguf(p)
    if p.is_dir():
        return describe_checkpoint(p)
    if not p.exists():
        raise InputError("no such file or folder", path=p)
    raise InputError("expected a .gguf file or a checkpoint folder", path=p)


def describe_gguf(path: Path) -> Report:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise CorruptCheckpoint(f"not a readable GGUF file ({type(exc).__name__}: {exc})", path=path) from exc
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if fld.types and fld.types[0] == gguf.GGUFValueType.ARRAY:
            meta[key] = f"[{len(fld.data)} items]"
            continue
        try:
            value = fld.contents()
        except Exception:
            value = "?"
        if isinstance(value, str) and len(value) > 80:
            value = value[:77] + "..."
        meta[key] = value
    rows = [
        TensorRow(t.name, t.tensor_type.name.lower(), tuple(int(x) for x in reversed(t.shape.tolist())), int(t.n_bytes))
        for t in reader.tensors
    ]
    return Report(str(path), "gguf", meta, rows)


def describe_checkpoint(path: Path) -> Report:
    import json

    from .model_source import ModelSource

    src = ModelSource.open(path)
    qcfg = src.config.get("quantization_config") or {}
    kind = "bnb4" if qcfg.get("load_in_4bit") else "checkpoint"
    widths = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    rows = []
    for name, info in src.tensors.items():
        n = 1
        for d in info.shape:
            n *= d
        rows.append(TensorRow(name, info.dtype.lower(), info.shape, n * widths.get(info.dtype, 1)))
    meta = {"model_type": src.model_type, "architectures": src.config.get("architectures")}
    if qcfg:
        meta["quantization_config"] = json.dumps(qcfg, sort_keys=True)
    if kind == "bnb4":
        rows = _fold_bnb4(src, rows)
    elif not qcfg and {r.type for r in rows if r.type.startswith(("f", "bf"))} <= {"f16", "bf16"}:
        kind = "hf16"
    return Report(str(path), kind, meta, rows)


def _fold_bnb4(src: Any, rows: list[TensorRow]) -> list[TensorRow]:
    """One row per packed 4-bit weight: type nf4/fp4, its real shape, and all its bytes (codes, absmax, nested
    absmax, code maps, quant-state JSON), so bits per weight is the true cost."""
    import json

    marker = ".quant_state.bitsandbytes__"
    by_name = {r.name: r for r in rows}
    folded: dict[str, TensorRow] = {}
    absorbed: set[str] = set()
    for name in by_name:
        if marker not in name:
            continue
        weight = name.split(marker)[0]
        info = json.loads(bytes(src.get(name).numpy().tobytes()).decode("utf-8"))
        members = [n for n in by_name if n == weight or n.startswith(weight + ".")]
        shape = tuple(int(d) for d in info.get("shape", ()))
        folded[weight] = TensorRow(weight, str(info.get("quant_type", name.split(marker)[1])), shape,
                                   sum(by_name[n].nbytes for n in members))
        absorbed.update(members)
    return [folded.get(r.name, r) for r in rows if r.name in folded or r.name not in absorbed]
