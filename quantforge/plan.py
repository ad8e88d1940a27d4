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
      blk.1.ffn_down.weight: {type: q4_k, optimize: gptq}  # rounding mode (quantize --optimize), per tensor
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
_TENSOR_KEYS = {"type", "predicted_kld", "bytes", "bpw", "optimize"}


@dataclass
class TensorChoice:
    type: str
    predicted_kld: float | None = None
    bytes: int | None = None
    bpw: float | None = None
    optimize: str | None = None  # rounding mode (quantforge.rounding.MODES); None: the quantize command's

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type}
        for k in ("predicted_kld", "bytes", "bpw", "optimize"):
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

    def optimize_modes(self) -> dict[str, str]:
        """The rounding mode recorded per tensor (only tensors that record one)."""
        return {name: c.optimize for name, c in self.tensors.items() if c.optimize is not None}

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
        unknown = sorted(set(d) - _TOP_KEYS, key=str)
        if unknown:
            raise PlanError(f"{source}: unknown keys {unknown}; allowed: {sorted(_TOP_KEYS)}")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"{source}: expected version: {PLAN_VERSION}, got {d.get('version')!r}")
        target = d.get("target")
        if target not in ("gguf", "bnb4"):
            raise PlanError(f"{source}: target must be 'gguf' or 'bnb4', got {target!r}")
        for key in ("tensors", "budget", "predicted", "calibration"):
            if not isinstance(d.get(key) or {}, dict):
                raise PlanError(f"{source}: {key} must be a mapping, got {type(d[key]).__name__}")
        for key in ("model", "notes", "base_type"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise PlanError(f"{source}: {key} must be a string, got {type(d[key]).__name__}")
        if not isinstance(d.get("double_quant", False), bool):
            raise PlanError(f"{source}: double_quant must be true or false, got {d['double_quant']!r}")
        tensors: dict[str, TensorChoice] = {}
        for name, spec in (d.get("tensors") or {}).items():
            if not isinstance(name, str):
                raise PlanError(f"{source}: tensor names must be strings, got {name!r}")
            if isinstance(spec, str):
                spec = {"type": spec}
            if not isinstance(spec, dict) or "type" not in spec:
                raise PlanError(f"{source}: tensor {name!r} needs a type")
            bad = sorted(set(spec) - _TENSOR_KEYS, key=str)
            if bad:
                raise PlanError(f"{source}: tensor {name!r} has unknown keys {bad}")
            fmt = str(spec["type"]).lower()
            if fmt not in FORMATS or FORMATS[fmt].family.value == "bnb":
                raise PlanError(f"{source}: tensor {name!r} has unknown GGUF type {spec['type']!r}")
            for key in ("predicted_kld", "bytes", "bpw"):
                value = spec.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise PlanError(f"{source}: tensor {name!r} has a non-numeric {key} {value!r}")
            mode = spec.get("optimize")
            if mode is not None:
                from .rounding import MODES

                if mode not in MODES:
                    raise PlanError(f"{source}: tensor {name!r} has optimize {mode!r}; expected one of {list(MODES)}")
            tensors[name] = TensorChoice(fmt, spec.get("predicted_kld"), spec.get("bytes"), spec.get("bpw"), mode)
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


MAX_PLAN_BYTES = 64 << 20
"""Largest plan file read (a plan of a 400B-parameter model is a few MB)."""


MAX_PLAN_NESTING = 32
"""Deepest nesting of mappings and lists read (a plan has 3); deeper input would exhaust the YAML composer's
recursion."""


def _nesting(text: str) -> int:
    """Deepest nesting of collections in the YAML ``text``, from the parser's event stream (which, unlike the
    composer, does not recurse; libyaml's when PyYAML has it, for speed); stops counting past
    :data:`MAX_PLAN_NESTING`."""
    import yaml

    depth = deepest = 0
    for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_PLAN_NESTING:
                break
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    return deepest


def load_plan(path: str | os.PathLike[str], target: str | None = None) -> Plan:
    """Read and validate a plan file. With ``target`` (``gguf`` or ``bnb4``), a plan made for the other target
    is refused: a writer never silently ignores the plan it was given."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise PlanError("is a folder; expected a plan file (YAML) written by 'quantforge plan'", path=p)
    if not p.is_file():
        raise PlanError("plan file not found", path=p)
    if p.stat().st_size > MAX_PLAN_BYTES:
        raise PlanError(f"is {p.stat().st_size:,} bytes, more than any plan ({MAX_PLAN_BYTES:,}); expected a plan "
                        "file (YAML) written by 'quantforge plan'", path=p)
    raw = p.read_bytes()
    if b"\0" in raw:
        raise PlanError("is a binary file; expected a plan file (YAML) written by 'quantforge plan'", path=p)
    try:
        text = raw.decode("utf-8")
        if _nesting(text) > MAX_PLAN_NESTING:
            raise PlanError(f"nests deeper than {MAX_PLAN_NESTING} levels, unlike any plan; expected a plan file "
                            "(YAML) written by 'quantforge plan'", path=p)
        data = yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise PlanError(f"is not UTF-8 text (byte {exc.start}); expected a plan file (YAML) written by "
                        "'quantforge plan'", path=p) from exc
    except yaml.YAMLError as exc:
        raise PlanError(" ".join(f"not valid YAML ({exc})".split()), path=p) from exc
    plan = Plan.from_dict(data, source=str(p))
    if target is not None and plan.target != target:
        raise PlanError(f"is a plan for target {plan.target}, but the output format is {target}; make one with "
                        f"'quantforge plan ... --target {target}'", path=p)
    return plan


def save_plan(plan: Plan, path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write ``plan`` as YAML (keys in a fixed order, deterministic bytes), atomically."""
    import yaml

    from .io import atomic_file

    text = yaml.safe_dump(plan.to_dict(), sort_keys=False, default_flow_style=None, width=120)
    with atomic_file(path, force=force) as tmp:
        tmp.write_text("# quantforge plan: edit the types, then apply with `quantforge quantize --plan`\n" + text)
    return Path(path)
