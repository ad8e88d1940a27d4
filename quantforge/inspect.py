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

    def notes(self) -> list[str]:
        """Plain-language explanations of the numbers (for GGUF: why bits/weight exceed the mix's nominal cost)."""
        return block_fallback_notes(self) if self.kind == "gguf" else []

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "kind": self.kind, "total_bytes": self.total_bytes, "params": self.total_params,
            "bpw": round(self.bpw, 4), "types": self.type_counts(), "notes": self.notes(), "metadata": self.metadata,
            "tensors": [{"name": t.name, "type": t.type, "shape": list(t.shape), "nbytes": t.nbytes}
                        for t in self.tensors],
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

    from .gguf_reader import open_gguf

    reader = open_gguf(path)
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if fld.types and fld.types[0] == gguf.GGUFValueType.ARRAY:
            meta[key] = f"[{len(fld.data)} items]"
            continue
        try:
            value = fld.contents()
        except (ValueError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise CorruptCheckpoint(f"metadata value {key!r} does not decode ({type(exc).__name__}: {exc})",
                                    path=path) from exc
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


def block_fallback_notes(report: Report) -> list[str]:
    """Why a K-quant GGUF costs more bits than its name suggests: K-quant blocks hold 256 weights, so a matrix whose
    rows are not a multiple of 256 (SmolLM2's 576-wide rows) cannot use them and takes the fallback type that
    llama.cpp also uses (q4_k -> q5_0, q6_k -> q8_0, ...), which costs more bits per weight."""
    from .formats import FORMATS
    from .presets import FALLBACK

    k_block = max((FORMATS[k].block_size for k in FALLBACK if k in FORMATS), default=256)
    fallbacks = set(FALLBACK.values())
    hit = [t for t in report.tensors if len(t.shape) >= 2 and t.type in fallbacks and t.shape[-1] % k_block]
    if not hit or not any(t.type in FALLBACK for t in report.tensors):
        return []
    widths = sorted({t.shape[-1] for t in hit})
    types = sorted({t.type for t in hit})
    rest = [t for t in report.tensors if t not in hit]
    n_hit, n_all = sum(t.numel for t in hit), max(report.total_params, 1)
    hit_bpw = 8.0 * sum(t.nbytes for t in hit) / max(n_hit, 1)
    rest_bpw = 8.0 * sum(t.nbytes for t in rest) / max(sum(t.numel for t in rest), 1)
    return [f"{len(hit)} of {len(report.tensors)} tensors ({100.0 * n_hit / n_all:.0f}% of the weights) have rows of "
            f"{', '.join(map(str, widths))} weights, not a multiple of the {k_block}-weight K-quant block, so they "
            f"use the fallback type{'s' if len(types) > 1 else ''} {', '.join(types)} (as llama.cpp does): "
            f"{hit_bpw:.2f} bits/weight there against {rest_bpw:.2f} for the other tensors, hence "
            f"{report.bpw:.2f} over the file"]


def mix_label(report: Report) -> str | None:
    """The GGUF's mix name from ``general.file_type`` (``q4_k_m``), with ``-dyn`` when its tensor types are not
    the ones that mix assigns (a plan from ``quantforge plan`` at that size), so a planned file is never labelled
    like the uniform one. ``None`` when the file names no known mix."""
    import gguf

    from .presets import MIXES, ModelShape, mix_types

    ft = report.metadata.get("general.file_type")
    if not isinstance(ft, int):
        return None
    try:
        name = gguf.LlamaFileType(ft).name.lower().removeprefix("mostly_").removeprefix("all_")
    except ValueError:
        return None
    if name not in MIXES:
        return name
    arch = report.metadata.get("general.architecture")
    meta = report.metadata
    try:
        shape = ModelShape(n_layer=int(meta[f"{arch}.block_count"]),
                           n_head=int(meta[f"{arch}.attention.head_count"]),
                           n_head_kv=int(meta.get(f"{arch}.attention.head_count_kv")
                                         or meta[f"{arch}.attention.head_count"]),
                           tied_embeddings=not any(t.name == "output.weight" for t in report.tensors),
                           n_expert=int(meta.get(f"{arch}.expert_count") or 0))
    except (KeyError, TypeError, ValueError):
        return name
    has_imatrix = any(k.startswith("quantize.imatrix.") for k in meta)
    expected = mix_types(name, [(t.name, t.shape) for t in report.tensors], shape, has_imatrix)
    planned = any(expected.get(t.name) not in (None, t.type) for t in report.tensors)
    return f"{name}-dyn" if planned else name
