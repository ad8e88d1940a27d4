"""Plan files: a per-tensor choice of formats a user can read, edit and re-apply.

YAML, versioned, unknown keys rejected. A GGUF plan lists every tensor's format (GGUF names) with its
predicted cost; a bnb4 plan lists the modules that stay 16-bit. ``quantforge quantize --plan`` applies a plan
exactly. Example::

    version: 1
    target: gguf
    base_type: q4_k_m            # mix for tensors the plan does not list (and general.file_type)
    tensors:
      blk.0.attn_v.weight: {type: q6_k, predicted_kld: 0.00012}
      blk.0.ffn_down.weight: q5_k  # the short form is accepted too
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PlanError, UnsupportedFormat
from .formats import FORMATS

PLAN_VERSION = 1
_TOP_KEYS = {"version", "target", "base_type", "tensors", "skip_modules", "quant_type", "double_quant", "budget",
             "predicted", "calibration", "model", "notes"}
_TENSOR_KEYS = {"type", "predicted_kld", "bytes", "bpw"}


@dataclass
class TensorChoice:
    type: str
    predicted_kld: float | None = None
    bytes: int | None = None
    bpw: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type}
        for k in ("predicted_kld", "bytes", "bpw"):
            v = getattr(self, k)
            if v is not None:
                d[k] = round(v, 8) if isinstance(v, float) else v
        return d


@dataclass
class Plan:
    target: str
    base_type: str | None = None
    tensors: dict[str, TensorChoice] = field(default_factory=dict)
    skip_modules: list[str] = field(default_factory=list)
    quant_type: str = "nf4"
    double_quant: bool = False
    budget: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    notes: str | None = None
    version: int = PLAN_VERSION

    def gguf_types(self) -> dict[str, str]:
        return {name: c.type for name, c in self.tensors.items()}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": self.version, "target": self.target}
        if self.model:
            d["model"] = self.model
        if self.target == "gguf":
            if self.base_type:
                d["base_type"] = self.base_type
            d["tensors"] = {k: self.tensors[k].to_dict() for k in self.tensors}
        else:
            d["quant_type"] = self.quant_type
            d["double_quant"] = self.double_quant
            d["skip_modules"] = list(self.skip_modules)
        for key in ("budget", "predicted", "calibration"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        if self.notes:
            d["notes"] = self.notes
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> Plan:
        if not isinstance(d, dict):
            raise PlanError(f"{source}: expected a mapping at the top level")
        unknown = sorted(set(d) - _TOP_KEYS)
        if unknown:
            raise PlanError(f"{source}: unknown keys {unknown}; allowed: {sorted(_TOP_KEYS)}")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"{source}: expected version: {PLAN_VERSION}, got {d.get('version')!r}")
        target = d.get("target")
        if target not in ("gguf", "bnb4"):
            raise PlanError(f"{source}: target must be 'gguf' or 'bnb4', got {target!r}")
        tensors: dict[str, TensorChoice] = {}
        for name, spec in (d.get("tensors") or {}).items():
            if isinstance(spec, str):
                spec = {"type": spec}
            if not isinstance(spec, dict) or "type" not in spec:
                raise PlanError(f"{source}: tensor {name!r} needs a type")
            bad = sorted(set(spec) - _TENSOR_KEYS)
            if bad:
                raise PlanError(f"{source}: tensor {name!r} has unknown keys {bad}")
            fmt = str(spec["type"]).lower()
            if fmt not in FORMATS or FORMATS[fmt].family.value == "bnb":
                raise PlanError(f"{source}: tensor {name!r} has unknown GGUF type {spec['type']!r}")
            tensors[name] = TensorChoice(fmt, spec.get("predicted_kld"), spec.get("bytes"), spec.get("bpw"))
        base = d.get("base_type")
        if base is not None:
            from .presets import get_mix

            try:
                get_mix(base)
            except UnsupportedFormat as exc:
                raise PlanError(f"{source}: {exc}") from exc
        quant_type = d.get("quant_type", "nf4")
        if quant_type not in ("nf4", "fp4"):
            raise PlanError(f"{source}: quant_type must be nf4 or fp4, got {quant_type!r}")
        skip = d.get("skip_modules") or []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise PlanError(f"{source}: skip_modules must be a list of module names")
        return cls(target=target, base_type=base, tensors=tensors, skip_modules=list(skip), quant_type=quant_type,
                   double_quant=bool(d.get("double_quant", False)), budget=d.get("budget") or {},
                   predicted=d.get("predicted") or {}, calibration=d.get("calibration") or {}, model=d.get("model"),
                   notes=d.get("notes"))


def load_plan(path: str | os.PathLike[str]) -> Plan:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise PlanError("plan file not found", path=p)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PlanError(f"not valid YAML ({exc})".replace("\n", " "), path=p) from exc
    return Plan.from_dict(data, source=str(p))


def save_plan(plan: Plan, path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write ``plan`` as YAML (keys in a fixed order, deterministic bytes), atomically."""
    import yaml

    from .io import atomic_file

    text = yaml.safe_dump(plan.to_dict(), sort_keys=False, default_flow_style=None, width=120)
    with atomic_file(path, force=force) as tmp:
        tmp.write_text("# quantforge plan: edit the types, then apply with `quantforge quantize --plan`\n" + text)
    return Path(path)
