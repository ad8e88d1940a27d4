"""Random linear layers for the rounding tests."""

from __future__ import annotations

import torch


def correlated_layer(n: int, rows: int = 16, tokens: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight ``(rows, n)`` and inputs ``(tokens, n)`` whose columns are correlated and unevenly scaled (as
    transformer activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 2.0 * torch.randn(n, n, generator=g) / n ** 0.5
    x = (torch.randn(tokens, n, generator=g) @ mix) * torch.exp(torch.randn(n, generator=g))
    w = torch.randn(rows, n, generator=g) * 0.02
    return w, x
