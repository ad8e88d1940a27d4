"""Training configuration: one versioned dataclass, validated, round-tripped through ``to_dict`` / ``from_dict``
(unknown keys rejected) so a checkpoint can check it is resumed with the same settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import InputError
from .arch import PROJECTIONS
from .lora import LoraSpec

CONFIG_VERSION = 1
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("auto", "adamw", "paged_adamw_8bit")
#: Settings that do not change the result, so a resumed run may differ in them.
_RESUMABLE = {"save_steps", "keep_checkpoints", "eval_steps"}


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. ``batch_tokens`` bounds a packed micro-batch; ``grad_accum`` micro-batches
    make an optimizer step. ``max_steps`` wins over ``epochs``. ``warmup`` is in steps (a value below 1 is a
    fraction of the total steps)."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: tuple[str, ...] = field(default_factory=lambda: tuple(PROJECTIONS))
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup: float = 0.0
    batch_tokens: int = 8192
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: int = 1
    max_seq_len: int = 2048
    eval_split: float = 0.02
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    optimizer: str = "auto"
    save_steps: int = 100
    keep_checkpoints: int = 2
    eval_steps: int | None = None
    gradient_checkpointing: bool = True
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        self.lora_spec()
        checks = [
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}"),
            (self.batch_tokens >= 2, f"--batch-tokens must be at least 2, got {self.batch_tokens}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.max_seq_len >= 2, f"--max-seq-len must be at least 2, got {self.max_seq_len}"),
            (self.batch_tokens >= self.max_seq_len,
             f"--batch-tokens ({self.batch_tokens}) must be at least --max-seq-len ({self.max_seq_len})"),
            (0 <= self.eval_split < 1, f"--eval-split must be in [0, 1), got {self.eval_split}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.save_steps >= 1, f"--save-steps must be at least 1, got {self.save_steps}"),
            (self.version == CONFIG_VERSION, f"expected config version {CONFIG_VERSION}, got {self.version}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(msg)

    def lora_spec(self) -> LoraSpec:
        return LoraSpec(self.rank, self.alpha, self.dropout, self.rslora, tuple(self.targets))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown training settings {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def differences(self, other: TrainConfig) -> list[str]:
        """Settings that differ from ``other`` and change the result (those a resume must keep)."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in _RESUMABLE and a[k] != b[k]]
