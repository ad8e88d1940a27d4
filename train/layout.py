"""Base-weight layouts: which registry format each projection's frozen weight is held in.

A layout turns one HF linear weight into a :class:`~quantforge.kernels.qweight.QuantWeight`. The trainer asks it
once per projection while streaming the checkpoint, so a layout that reads pre-quantized bytes (a GGUF file, say)
fits the same slot: :meth:`BaseLayout.weight` receives the tensor name and the open source and returns the
weight, already on ``device``.

* :class:`UniformLayout`: every projection in one format (``nf4`` with double quantization by default; a float
  format such as ``bf16`` for plain 16-bit LoRA).
* :class:`Bnb4PlanLayout`: a ``target: bnb4`` plan; modules it lists in ``skip_modules`` stay 16-bit.
* :class:`~.gguf_base.GgufPlanLayout` / :class:`~.gguf_base.GgufFileLayout`: a GGUF plan applied in memory, or a
  GGUF file read directly; they also give the embedding and output head as the GGUF holds them (:meth:`tensor`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import PlanError, UnsupportedFormat
from ..formats import FORMATS, Family
from ..kernels.qweight import QuantWeight
from ..model_source import ModelSource
from ..plan import Plan

_FLOAT_FMT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


class BaseLayout(Protocol):
    """Chooses and builds the frozen weight of each projection."""

    def weight(self, name: str, source: ModelSource, device: torch.device, dtype: torch.dtype) -> QuantWeight:
        """The weight ``name`` (an HF tensor name ending in ``.weight``) on ``device``; ``dtype`` is the compute
        dtype (the float format kept for 16-bit modules)."""

    def tensor(self, name: str, source: ModelSource, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A frozen non-projection tensor (embedding, norm, bias, output head) in ``dtype`` on ``device``."""

    def describe(self) -> dict[str, Any]:
        """What to record beside the adapter so the base can be rebuilt exactly."""


def source_tensor(name: str, source: ModelSource, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The checkpoint's tensor as stored, cast to ``dtype`` (what 16-bit and bitsandbytes layouts keep)."""
    return source.get(name).to(device=device, dtype=dtype)


def _load(name: str, source: ModelSource, device: torch.device) -> torch.Tensor:
    w = source.get(name)
    return w.to(device, non_blocking=False)


def float_format(dtype: torch.dtype) -> str:
    return _FLOAT_FMT[dtype]


@dataclass
class UniformLayout:
    """One format for every projection (``fmt=None`` means the compute dtype: plain 16-bit LoRA)."""

    fmt: str | None = "nf4"
    double_quant: bool = True

    def __post_init__(self) -> None:
        if self.fmt is not None and self.fmt not in FORMATS:
            raise UnsupportedFormat(f"unknown base format {self.fmt!r}; expected nf4, fp4, bf16, f16, f32 or a GGUF "
                                    "type")

    def weight(self, name: str, source: ModelSource, device: torch.device, dtype: torch.dtype) -> QuantWeight:
        fmt = self.fmt or float_format(dtype)
        w = _load(name, source, device)
        if FORMATS[fmt].family is Family.FLOAT:
            return QuantWeight.quantize(w.to(dtype), fmt)
        return QuantWeight.quantize(w, fmt, double_quant=self.double_quant)

    tensor = staticmethod(source_tensor)

    def describe(self) -> dict[str, Any]:
        return {"base_format": self.fmt or "compute-dtype", "double_quant": self.double_quant}


def skip_matches(module: str, patterns: list[str]) -> bool:
    """transformers' ``llm_int8_skip_modules`` rule: a pattern matches from the start up to a module boundary,
    as a regex with the same boundary, or as a suffix."""
    return any(re.match(rf"(?:{p}){_BOUNDARY}", module) or module.endswith(p) for p in patterns)


@dataclass
class Bnb4PlanLayout:
    """A bnb4 plan: ``quant_type`` (double-quantized when the plan says so) except ``skip_modules`` (16-bit)."""

    plan: Plan
    source: str | None = None

    def check(self, module_names: list[str]) -> None:
        """Every ``skip_modules`` entry must name a module of this model (a plan made for another model fails)."""
        if self.plan.target != "bnb4":
            raise PlanError(f"the trainer takes a bnb4 plan, got target {self.plan.target!r}", path=self.source)
        for entry in self.plan.skip_modules:
            try:
                hit = any(skip_matches(m, [entry]) for m in module_names)
            except re.error as exc:
                raise PlanError(f"skip_modules entry {entry!r} is not a valid pattern ({exc})",
                                path=self.source) from exc
            if not hit:
                raise PlanError(f"skip_modules names {entry!r}, which this model does not have (its modules look "
                                f"like {module_names[0]!r}); was the plan made for another model?", path=self.source)

    def weight(self, name: str, source: ModelSource, device: torch.device, dtype: torch.dtype) -> QuantWeight:
        module = name.removesuffix(".weight")
        w = _load(name, source, device)
        if skip_matches(module, list(self.plan.skip_modules)):
            return QuantWeight.quantize(w.to(dtype), float_format(dtype))
        return QuantWeight.quantize(w, self.plan.quant_type, double_quant=self.plan.double_quant)

    tensor = staticmethod(source_tensor)

    def describe(self) -> dict[str, Any]:
        return {"base_format": "bnb4-plan", "plan_file": self.source, "plan": self.plan.to_dict()}
