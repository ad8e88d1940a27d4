"""LoRA over a frozen base weight held in its registry layout (:class:`~quantforge.kernels.qweight.QuantWeight`).

``y = x W^T + s (drop(x) A^T) B^T (+ bias)`` with ``s = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA), computed by
:func:`quantforge.kernels.lora_linear.lora_linear`. ``A`` is ``(r, in)``, ``B`` ``(out, r)``, both trainable float32
masters (cast to the compute dtype inside the forward); ``W`` is never a parameter and never gets a gradient.
A projection without LoRA is the same module with ``A = B = None`` (a plain quantized linear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError
from ..kernels.lora_linear import lora_linear
from ..kernels.qweight import QuantWeight
from .arch import PROJECTIONS


@dataclass(frozen=True)
class LoraSpec:
    """Adapter hyper-parameters: rank, alpha, dropout, rsLoRA scaling and the targeted projections."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: tuple[str, ...] = field(default_factory=lambda: tuple(PROJECTIONS))

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InputError(f"--rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad or not self.targets:
            raise InputError(f"--targets must name some of {', '.join(PROJECTIONS)}, got {', '.join(bad) or 'none'}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoraLinear(nn.Module):
    """One projection: frozen ``QuantWeight`` base (+ frozen bias) and optional trainable ``lora_A`` / ``lora_B``."""

    def __init__(self, base: QuantWeight, bias: torch.Tensor | None, spec: LoraSpec | None) -> None:
        super().__init__()
        self.base = base
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        out_f, in_f = base.shape
        self.scale = spec.scale if spec is not None else 0.0
        self.dropout = nn.Dropout(spec.dropout) if spec is not None and spec.dropout > 0 else None
        if spec is None:
            self.lora_A = self.lora_B = None
            return
        dev = base.device
        self.lora_A = nn.Parameter(torch.empty(spec.rank, in_f, dtype=torch.float32, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(out_f, spec.rank, dtype=torch.float32, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_x = self.dropout(x) if self.dropout is not None and self.training else None
        return lora_linear(x, self.base, self.lora_A, self.lora_B, self.scale, bias=self.bias, lora_x=lora_x)
