"""CI regression gate: compare a results document with a baseline, metric by metric. Pure: no I/O, no models.

Artifacts are matched by ``name``. For each matched artifact:

- ``kld_mean`` may rise by at most ``max_kld_increase`` (nats, absolute);
- every accuracy in the baseline (``<task>_acc``, ``<task>_acc_norm``) may fall by at most ``max_acc_drop``
  (absolute fraction, 0.02 = two points);
- optionally ``top1`` may fall by at most ``max_top1_drop`` and ``ppl`` may rise by at most
  ``max_ppl_increase`` (relative, 0.01 = 1%).

A metric the baseline has but the new results lack (or hold as null) fails with ``value`` null. Each failure
records ``limit``: the worst value the gate would have accepted. Baseline artifacts absent from the new results
are listed in ``skipped``; with no artifact in common the comparison is an input error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InputError

ACC_SUFFIXES = ("_acc", "_acc_norm")
HIGHER_IS_WORSE = ("kld_mean", "ppl")


@dataclass(frozen=True)
class Limits:
    """Thresholds; ``None`` switches a check off."""

    max_kld_increase: float | None = None
    max_acc_drop: float | None = None
    max_top1_drop: float | None = None
    max_ppl_increase: float | None = None

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value is not None and (not math.isfinite(value) or value < 0):
                raise InputError(f"--{key.replace('_', '-')} must be a finite number >= 0; got {value}")

    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())


@dataclass(frozen=True)
class Failure:
    artifact: str
    metric: str
    baseline: float
    value: float | None
    limit: float

    def line(self) -> str:
        """One human line: ``REGRESSION q4_k_m.gguf kld_mean: 0.0912 > limit 0.0600 (baseline 0.0500)``."""
        got = "missing" if self.value is None else f"{self.value:.6g}"
        op = ">" if self.metric in HIGHER_IS_WORSE else "<"
        return (f"REGRESSION {self.artifact} {self.metric}: {got} {op} limit {self.limit:.6g} "
                f"(baseline {self.baseline:.6g})")


@dataclass
class GateResult:
    passed: bool
    failures: list[Failure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    compared: list[str] = field(default_factory=list)

    def to_dict(self, baseline: str | None, limits: Limits) -> dict[str, Any]:
        return {
            "passed": self.passed, "baseline": baseline, "limits": asdict(limits),
            "failures": [asdict(f) for f in self.failures], "skipped": self.skipped, "compared": self.compared,
        }


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    return None


def _checks(base_metrics: dict[str, Any], limits: Limits) -> list[tuple[str, float, bool, str]]:
    """``(metric, allowance, higher_is_worse, mode)`` for every gated metric the baseline has."""
    checks = []
    if limits.max_kld_increase is not None and "kld_mean" in base_metrics:
        checks.append(("kld_mean", limits.max_kld_increase, True, "abs"))
    if limits.max_acc_drop is not None:
        for key in sorted(base_metrics):
            if key.endswith(ACC_SUFFIXES):
                checks.append((key, limits.max_acc_drop, False, "abs"))
    if limits.max_top1_drop is not None and "top1" in base_metrics:
        checks.append(("top1", limits.max_top1_drop, False, "abs"))
    if limits.max_ppl_increase is not None and "ppl" in base_metrics:
        checks.append(("ppl", limits.max_ppl_increase, True, "rel"))
    return checks


def compare(results: dict[str, Any], baseline: dict[str, Any], limits: Limits) -> GateResult:
    """Gate ``results`` against ``baseline`` (both schema-valid documents)."""
    if not limits.any():
        raise InputError("the gate needs at least one limit: --max-kld-increase, --max-acc-drop, "
                         "--max-top1-drop or --max-ppl-increase")
    new = {a["name"]: a for a in results["artifacts"]}
    old = {a["name"]: a for a in baseline["artifacts"]}
    common = [n for n in old if n in new]
    if not common:
        raise InputError(f"no artifact in common with the baseline: new {sorted(new)}, baseline {sorted(old)}; "
                         "the gate matches artifacts by file or folder name")
    gate = GateResult(passed=True, skipped=[n for n in old if n not in new], compared=common)
    for name in common:
        base_metrics, new_metrics = old[name]["metrics"], new[name]["metrics"]
        for metric, allowance, higher_is_worse, mode in _checks(base_metrics, limits):
            ref = _num(base_metrics.get(metric))
            if ref is None:
                continue
            delta = allowance * ref if mode == "rel" else allowance
            limit = ref + delta if higher_is_worse else ref - delta
            value = _num(new_metrics.get(metric))
            bad = value is None or (value > limit if higher_is_worse else value < limit)
            if bad:
                gate.failures.append(Failure(name, metric, ref, value, limit))
    gate.passed = not gate.failures
    return gate
