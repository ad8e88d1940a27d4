"""Which tensors a model's GGUF holds and which type each one gets.

Shared by the exporters (what to write), the planner CLI (what to plan) and calibration (what to measure), so no
stage reaches into another's internals for it. Nothing here loads tensor data.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from . import arch as archmod
from .errors import CorruptCheckpoint, ImatrixRequired, PlanError
from .formats import get_format
from .model_source import ModelSource
from .presets import ModelShape, imatrix_required, mix_types


@dataclass
class TensorJob:
    """One output tensor: where it comes from, what it becomes."""

    gguf_name: str
    hf_name: str | None
    shape: tuple[int, ...]
    fmt: str = "f32"
    segments: tuple[Segment, ...] = ()
    """Where the rows come from when they are not all of ``hf_name`` (stacked experts): in order, each a run of
    rows of one checkpoint tensor."""

    @property
    def n_experts(self) -> int:
        """Experts stacked in this tensor (0 for an ordinary tensor)."""
        return self.shape[0] if len(self.shape) == 3 else 0


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of checkpoint tensor ``hf_name`` (of its expert ``expert`` when the tensor stacks
    every expert in 3-D)."""

    hf_name: str
    expert: int | None
    start: int
    stop: int


def _sort_key(name: str) -> tuple[int, int, str]:
    m = re.match(r"^blk\.(\d+)\.(.*)$", name)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (0 if name == "token_embd.weight" else 2, 0, name)


def plan_tensors(src: ModelSource, spec: archmod.ArchSpec) -> list[TensorJob]:
    """GGUF tensors of the model in llama.cpp's visiting order (block, then name), without loading data.

    Mixture-of-experts checkpoints store one tensor per expert and projection; each set becomes one 3-D tensor
    ``[n_expert, rows, cols]`` whose rows are read expert by expert (:class:`Segment`)."""
    cfg = src.text_config
    tied = bool(cfg.get("tie_word_embeddings", src.config.get("tie_word_embeddings", False)))
    jobs: dict[str, TensorJob] = {}
    experts: dict[str, dict[int, tuple[str, int | None, int, int, tuple[int, ...]]]] = {}
    towers = [name for name in src.tensors if archmod.text_name(spec, name) is None]
    if towers:
        logging.getLogger("quantforge").info(
            "the GGUF holds the language model only: skipped %d vision-tower and projector tensors (llama.cpp "
            "reads those from a separate mmproj file)", len(towers))
    for name, info in src.tensors.items():
        text = archmod.text_name(spec, name)
        if text == "lm_head.weight" and (tied or spec.drop_lm_head):
            continue
        gname = archmod.gguf_name(spec, name)
        if gname is None:
            continue
        parts = archmod.expert_parts(spec, text or name)
        for part in parts:
            _add_expert(experts.setdefault(part.gguf_name, {}), part, name, info.shape, src)
        if not parts:
            jobs[gname] = TensorJob(gname, name, info.shape)
    n_expert = archmod.n_experts(spec, cfg)
    for gname, by_expert in experts.items():
        jobs[gname] = _stacked_job(gname, by_expert, n_expert, src)
    if "token_embd.weight" not in jobs:
        raise CorruptCheckpoint("the checkpoint has no model.embed_tokens.weight", path=src.path)
    for name, shape in archmod.extra_tensors(spec, cfg).items():
        jobs[name] = TensorJob(name, None, shape)
    return [jobs[k] for k in sorted(jobs, key=_sort_key)]


def _add_expert(slots: dict[int, Any], part: archmod.ExpertPart, name: str, shape: tuple[int, ...],
                src: ModelSource) -> None:
    """Record the rows of ``name`` that expert slot(s) of one stacked tensor take."""
    if part.expert is not None:
        if len(shape) != 2:
            raise CorruptCheckpoint(f"expert tensor {name!r} has shape {list(shape)}, expected 2-D", path=src.path)
        slots[part.expert] = (name, None, 0, shape[0], shape)
        return
    if len(shape) != 3:
        raise CorruptCheckpoint(f"stacked expert tensor {name!r} has shape {list(shape)}, expected 3-D",
                                path=src.path)
    rows = shape[1] // 2 if part.half is not None else shape[1]
    start = rows * part.half if part.half is not None else 0
    for e in range(shape[0]):
        slots[e] = (name, e, start, start + rows, (rows, shape[2]))


def _stacked_job(gname: str, by_expert: dict[int, Any], n_expert: int, src: ModelSource) -> TensorJob:
    missing = sorted(set(range(n_expert)) - set(by_expert))
    if missing or len(by_expert) != n_expert:
        raise CorruptCheckpoint(f"{gname}: the checkpoint lacks experts {missing[:5]} of {n_expert} (or has extra "
                                "ones)", path=src.path)
    shapes = {by_expert[e][4] for e in range(n_expert)}
    if len(shapes) != 1:
        raise CorruptCheckpoint(f"{gname}: experts have different shapes {sorted(shapes)}", path=src.path)
    segs = tuple(Segment(name, lead, a, b) for name, lead, a, b, _ in (by_expert[e] for e in range(n_expert)))
    return TensorJob(gname, segs[0].hf_name, (n_expert, *shapes.pop()), segments=segs)


def model_shape(src: ModelSource, jobs: list[TensorJob]) -> ModelShape:
    cfg = src.text_config
    return ModelShape(
        n_layer=int(cfg["num_hidden_layers"]),
        n_head=int(cfg["num_attention_heads"]),
        n_head_kv=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        tied_embeddings=not any(j.gguf_name == "output.weight" for j in jobs),
        n_expert=archmod.n_experts(archmod.arch_for(src.model_type), cfg),
    )


def assign_types(jobs: list[TensorJob], qtype: str, shape: ModelShape, has_imatrix: bool,
                 plan_types: dict[str, str] | None = None) -> None:
    """Give every job its format: a plan's per-tensor types when given, else the mix's rules."""
    types = mix_types(qtype, [(j.gguf_name, j.shape) for j in jobs], shape, has_imatrix)
    if plan_types:
        unknown = sorted(set(plan_types) - set(types))
        if unknown:
            raise PlanError(f"plan names tensors the model does not have: {', '.join(unknown[:5])}")
        for name, fmt in plan_types.items():
            f = get_format(fmt)
            if not f.fits(dict((j.gguf_name, j.shape) for j in jobs)[name][-1]):
                raise PlanError(f"plan gives {name} type {fmt}, whose block size {f.block_size} does not divide "
                                "its rows")
            types[name] = fmt
    needs = [] if has_imatrix else imatrix_required(types, qtype)
    if needs:
        raise ImatrixRequired(f"{types[needs[0]]} (for {needs[0]} and {len(needs) - 1} more tensors) cannot be made "
                              "without an importance matrix, as in llama-quantize; pass --imatrix")
    for j in jobs:
        j.fmt = types[j.gguf_name]


def typed_jobs(src: ModelSource, spec: archmod.ArchSpec, qtype: str, has_imatrix: bool,
               plan_types: dict[str, str] | None = None) -> list[TensorJob]:
    """The GGUF's tensors, each with the type ``quantize --type qtype`` (or a plan's ``plan_types`` over that base
    mix) writes it in: the one resolution the writer, the trainer's GGUF layout and the calibration share."""
    jobs = plan_tensors(src, spec)
    assign_types(jobs, qtype, model_shape(src, jobs), has_imatrix, plan_types)
    return jobs
