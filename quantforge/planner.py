"""The dynamic planner: per-tensor formats from a sensitivity table and a size budget. Pure functions.

The problem is a multiple-choice knapsack: every tensor ``t`` takes exactly one option ``k`` (a format) with a
size ``b_tk`` (bytes, from the format registry) and a cost ``c_tk`` (the predicted increase of the mean KL
divergence when that tensor alone takes that format; costs are added over tensors). Minimize ``sum c`` subject to
``sum b + fixed <= budget``.

Two solvers, both returning a choice whose exact byte total is within the budget:

* ``dp`` (default): dynamic programming over byte sizes discretized into ``resolution`` units. Each option's
  extra size over its tensor's smallest option is rounded *up* to whole units and the budget *down*, so any DP
  solution fits the true budget; the DP is exact on the rounded sizes. A greedy pass then spends the slack the
  rounding left (upgrades that still fit, best cost reduction first).
* ``lagrange``: drop dominated options, walk each tensor's lower convex hull of (bytes, cost) in order of the
  best cost decrease per byte across all tensors (this is the Lagrangian relaxation's path as the multiplier
  falls), stop when the next step does not fit, then fill greedily. Scales to any number of tensors.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, PlanError
from .formats import get_format
from .plan import Plan, TensorChoice

SENSITIVITY_VERSION = 1
DEFAULT_RESOLUTION = 20000


@dataclass(frozen=True)
class Option:
    fmt: str
    nbytes: int
    cost: float


@dataclass
class Item:
    name: str
    options: list[Option]


def load_sensitivity(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``sensitivity.json`` of a calibration folder (or the file itself)."""
    p = Path(folder)
    p = p / "sensitivity.json" if p.is_dir() else p
    if not p.is_file():
        raise InputError("no sensitivity.json; run 'quantforge calibrate' first", path=p)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"sensitivity table is not valid JSON ({exc.msg})", path=p) from exc
    if not isinstance(data, dict) or data.get("version") != SENSITIVITY_VERSION or "tensors" not in data:
        raise InputError(f"expected a sensitivity table of version {SENSITIVITY_VERSION}", path=p)
    return data


def _check_items(items: Sequence[Item]) -> None:
    for it in items:
        if not it.options:
            raise PlanError(f"tensor {it.name} has no candidate format")


def min_bytes(items: Sequence[Item]) -> int:
    return sum(min(o.nbytes for o in it.options) for it in items)


def solve(items: Sequence[Item], budget: int, method: str = "dp", resolution: int = DEFAULT_RESOLUTION) -> list[Option]:
    """One option per item with ``sum nbytes <= budget`` and (near-)minimal ``sum cost``."""
    _check_items(items)
    floor = min_bytes(items)
    if floor > budget:
        raise PlanError(f"the budget of {budget} bytes is below the smallest possible size {floor} bytes "
                        f"(every tensor at its smallest candidate); raise the budget or add lower-bit candidates")
    if method == "dp":
        choice = _solve_dp(items, budget, resolution)
    elif method == "lagrange":
        choice = _solve_hull(items, budget)
    else:
        raise InputError(f"unknown planner method {method!r}; expected dp or lagrange")
    choice = _fill(items, choice, budget)
    total = sum(o.nbytes for o in choice)
    if total > budget:
        raise PlanError(f"planner produced {total} bytes over the budget {budget} (a bug; please report)")
    return choice


def _solve_dp(items: Sequence[Item], budget: int, resolution: int) -> list[Option]:
    import numpy as np

    base = [min(o.nbytes for o in it.options) for it in items]
    spare = budget - sum(base)
    unit = max(1, math.ceil(spare / max(resolution, 1)))
    cap = spare // unit
    inf = np.inf
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    picks = np.zeros((len(items), cap + 1), dtype=np.int16)
    for n, (it, b0) in enumerate(zip(items, base, strict=True)):
        new = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, dtype=np.int16)
        for k, o in enumerate(it.options):
            w = math.ceil((o.nbytes - b0) / unit)
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[: cap + 1 - w] + o.cost
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        best, picks[n] = new, arg
    s = int(np.argmin(best))
    out: list[Option] = []
    for n in range(len(items) - 1, -1, -1):
        o = items[n].options[int(picks[n, s])]
        out.append(o)
        s -= math.ceil((o.nbytes - base[n]) / unit)
    return out[::-1]


def _hull(options: list[Option]) -> list[Option]:
    """Lower convex hull of (bytes, cost), from the smallest option on, with dominated options removed."""
    pts: list[Option] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.cost)):
        if pts and o.cost >= pts[-1].cost:
            continue
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            if (b.cost - a.cost) * (o.nbytes - a.nbytes) >= (o.cost - a.cost) * (b.nbytes - a.nbytes):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def _solve_hull(items: Sequence[Item], budget: int) -> list[Option]:
    import heapq

    hulls = [_hull(it.options) for it in items]
    pos = [0] * len(items)
    total = sum(h[0].nbytes for h in hulls)
    heap: list[tuple[float, int]] = []

    def push(n: int) -> None:
        h, p = hulls[n], pos[n]
        if p + 1 < len(h):
            a, b = h[p], h[p + 1]
            heapq.heappush(heap, (-(a.cost - b.cost) / max(b.nbytes - a.nbytes, 1), n))

    for n in range(len(items)):
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        a, b = hulls[n][pos[n]], hulls[n][pos[n] + 1]
        if total + b.nbytes - a.nbytes > budget:
            break
        total += b.nbytes - a.nbytes
        pos[n] += 1
        push(n)
    return [h[p] for h, p in zip(hulls, pos, strict=True)]


def _fill(items: Sequence[Item], choice: list[Option], budget: int) -> list[Option]:
    """Spend the slack: repeatedly take the single upgrade that fits and lowers the cost the most per byte."""
    choice = list(choice)
    total = sum(o.nbytes for o in choice)
    while True:
        best, pick = 0.0, None
        for n, it in enumerate(items):
            cur = choice[n]
            for o in it.options:
                extra = o.nbytes - cur.nbytes
                gain = cur.cost - o.cost
                if gain > 0 and total + extra <= budget:
                    score = gain / max(extra, 1)
                    if score > best:
                        best, pick = score, (n, o)
        if pick is None:
            return choice
        n, o = pick
        total += o.nbytes - choice[n].nbytes
        choice[n] = o


def gguf_items(table: dict[str, Any], tensors: Sequence[tuple[str, tuple[int, ...]]], allowed: set[str] | None = None,
               has_imatrix: bool = True) -> tuple[list[Item], int]:
    """Knapsack items for the quantizable tensors of a GGUF file and the fixed bytes of the others.

    ``tensors`` are the file's (GGUF name, shape) pairs; tensors llama-quantize may not re-type (norms, biases)
    keep ``f32`` and count as fixed bytes. Without an imatrix (``has_imatrix``), the types a tensor can only take
    with one (:func:`quantforge.presets.needs_imatrix`) are not offered.
    """
    from .formats import get_format
    from .presets import needs_imatrix, quantizable

    entries = table["tensors"]
    items, fixed = [], 0
    for name, shape in tensors:
        if not quantizable(name, shape):
            fixed += get_format("f32").nbytes(shape)
            continue
        if name not in entries:
            raise PlanError(f"the calibration has no entry for tensor {name}; recalibrate this model")
        opts = []
        for fmt, rec in entries[name]["candidates"].items():
            if fmt == "nf4" or (allowed is not None and fmt not in allowed and fmt != "f16"):
                continue
            if not has_imatrix and needs_imatrix(fmt, name):
                continue
            if rec.get("predicted_kld") is None:
                continue
            opts.append(Option(fmt, get_format(fmt).nbytes(tuple(shape)), float(rec["predicted_kld"])))
        items.append(Item(name, opts))
    return items, fixed


def plan_gguf(table: dict[str, Any], tensors: Sequence[tuple[str, tuple[int, ...]]], budget: int,
              base_type: str | None = None, method: str = "dp", allowed: set[str] | None = None,
              budget_note: dict[str, Any] | None = None, has_imatrix: bool = True) -> Plan:
    """A GGUF plan: every quantizable tensor's format, total tensor bytes ``<= budget`` (without an imatrix, no
    type that needs one)."""
    items, fixed = gguf_items(table, tensors, allowed, has_imatrix)
    choice = solve(items, budget - fixed, method)
    n_el = sum(math.prod(s) for _, s in tensors)
    chosen_bytes = fixed + sum(o.nbytes for o in choice)
    plan = Plan(target="gguf", base_type=base_type)
    shapes = dict(tensors)
    for it, o in zip(items, choice, strict=True):
        shape = shapes[it.name]
        plan.tensors[it.name] = TensorChoice(o.fmt, float(f"{o.cost:.6g}"), o.nbytes,
                                             round(8.0 * o.nbytes / math.prod(shape), 4))
    plan.budget = {"bytes": int(budget), **(budget_note or {})}
    plan.predicted = {"kld_sum": float(f"{sum(o.cost for o in choice):.6g}"), "tensor_bytes": int(chosen_bytes),
                      "bpw": round(8.0 * chosen_bytes / n_el, 4), "method": method}
    return plan


def bnb4_bytes(n: int, double_quant: bool = False) -> int:
    """Bytes of ``n`` weights in bitsandbytes 4-bit: packed codes plus absmax per 64 (fp32, or uint8 plus an
    fp32 per 256 blocks with double quantization)."""
    fmt = get_format("nf4")
    blocks = -(-n // fmt.block_size)
    return n // 2 + (blocks + 4 * -(-blocks // fmt.nested_block) if double_quant else 4 * blocks)


def plan_bnb4(table: dict[str, Any], params: dict[str, tuple[int, ...]], max_overhead: float,
              double_quant: bool = False, method: str = "dp") -> Plan:
    """A Dynamic 4-bit plan: the linear modules that stay 16-bit, at most ``max_overhead`` more memory than the
    uniform 4-bit checkpoint (which quantizes every decoder linear and keeps embeddings, norms and lm_head
    16-bit).

    ``params`` maps every HF parameter name of the model to its shape.
    """
    if max_overhead < 0:
        raise InputError(f"--max-overhead must be >= 0, got {max_overhead}")
    linear = {}
    for e in table["tensors"].values():
        rec = e["candidates"].get("nf4")
        if rec is not None and rec.get("predicted_kld") is not None:
            linear[e["hf_name"]] = float(rec["predicted_kld"])
    missing = sorted(set(linear) - set(params))
    if missing:
        raise PlanError(f"the calibration names weights the model does not have: {', '.join(missing[:3])}")
    items, uniform = [], 0
    for name, shape in params.items():
        n = math.prod(shape)
        if name in linear:
            q = bnb4_bytes(n, double_quant)
            uniform += q
            items.append(Item(name, [Option("nf4", q, linear[name]), Option("bf16", 2 * n, 0.0)]))
        else:
            uniform += 2 * n
    fixed = uniform - sum(it.options[0].nbytes for it in items)
    budget = int(uniform * (1.0 + max_overhead))
    choice = solve(items, budget - fixed, method)
    skipped = sorted(it.name for it, o in zip(items, choice, strict=True) if o.fmt == "bf16")
    total = fixed + sum(o.nbytes for o in choice)
    modules = ["lm_head"] + [s[: -len(".weight")] if s.endswith(".weight") else s for s in skipped]
    plan = Plan(target="bnb4", skip_modules=modules, quant_type="nf4", double_quant=double_quant)
    plan.budget = {"max_overhead": max_overhead, "uniform_bytes": uniform, "bytes": budget}
    plan.predicted = {"kld_sum": float(f"{sum(o.cost for o in choice):.6g}"),
                      "uniform_kld_sum": float(f"{sum(it.options[0].cost for it in items):.6g}"),
                      "bytes": total, "overhead": round(total / uniform - 1.0, 5),
                      "kept_16bit": {s: float(f"{linear[s]:.6g}") for s in skipped}}
    return plan
