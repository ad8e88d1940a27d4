"""Calibration settings: everything that changes the results, and so the cache key."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InputError
from . import candidates as cand

Progress = Callable[..., Iterable[Any]]
MEASURE_MODES = ("all", "sample", "none")


def no_progress(items: Iterable[Any], **_: Any) -> Iterable[Any]:
    return items


@dataclass
class CalibrationSettings:
    """Everything that changes the results (all of it is part of the cache key)."""

    tokens: int = 8192
    ctx: int = 512
    holdout_tokens: int = 512
    candidates: list[str] = field(default_factory=lambda: list(cand.DEFAULT_CANDIDATES))
    measure: str = "sample"
    sample_layers: int = 4
    fisher_draws: int = 4
    proxy_rows: int = 256
    seed: int = 0
    rounding: str = "rtn"
    """How the candidates are rounded for the proxies and measurements: ``rtn`` (each type's default) or an
    optimized mode of :mod:`quantforge.rounding` (``gptq`` needs the inputs' second moments, which the same run
    collects), so a plan's predictions hold for the rounding its quantizer applies."""

    def validate(self) -> None:
        if self.measure not in MEASURE_MODES:
            raise InputError(f"--measure must be one of {', '.join(MEASURE_MODES)}, got {self.measure!r}")
        if self.tokens < self.ctx:
            raise InputError(f"--tokens ({self.tokens}) must be at least one context ({self.ctx})")
        if self.holdout_tokens < self.ctx:
            raise InputError(f"--holdout-tokens ({self.holdout_tokens}) must be at least one context ({self.ctx})")
        from ..rounding import MODES

        if self.rounding not in MODES:
            raise InputError(f"--optimize must be one of {', '.join(MODES)}, got {self.rounding!r}")
        self.candidates = cand.parse_candidates(",".join(self.candidates))

    def imatrix_part(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "ctx": self.ctx}

    def sensitivity_part(self) -> dict[str, Any]:
        """The settings in the sensitivity key; the default rounding is left out, so folders calibrated before
        the rounding mode existed stay valid."""
        out = asdict(self)
        if self.rounding == "rtn":
            del out["rounding"]
        return out
