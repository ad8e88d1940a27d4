"""Hook plumbing: attach forward hooks to ``nn.Linear`` modules for the length of a ``with`` block.

The math that consumes what the hooks see lives in :mod:`.imatrix` and :mod:`.sensitivity`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


def linear_modules(root: Any, prefix: str = "") -> dict[str, Any]:
    """``{qualified name: module}`` of every ``nn.Linear`` under ``root`` (names prefixed with ``prefix``)."""
    import torch

    return {f"{prefix}{name}": m for name, m in root.named_modules() if isinstance(m, torch.nn.Linear)}


@contextlib.contextmanager
def capture_inputs(modules: dict[str, Any], sink: Callable[[str, Any], None]) -> Iterator[None]:
    """Call ``sink(name, x)`` with the input ``x`` (``[..., in_features]``) of each module on every forward.

    This is the ``src1`` of llama.cpp's ``MUL_MAT`` for that weight. The hooks are removed on exit, also on error.
    """
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(_pre_hook(name, sink)))
        yield
    finally:
        for h in handles:
            h.remove()


def _pre_hook(name: str, sink: Callable[[str, Any], None]) -> Callable[..., None]:
    def hook(module: Any, args: tuple[Any, ...]) -> None:
        sink(name, args[0].detach())

    return hook


@contextlib.contextmanager
def swapped_weight(module: Any, weight: Any) -> Iterator[None]:
    """Temporarily replace ``module.weight``'s data by ``weight`` (same shape), restoring it on exit."""
    original = module.weight.data
    try:
        module.weight.data = weight.to(device=original.device, dtype=original.dtype)
        yield
    finally:
        module.weight.data = original


@contextlib.contextmanager
def weight_grads(params: list[Any]) -> Iterator[None]:
    """Let ``params`` collect gradients inside the block (and only them); grads are cleared on exit."""
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        yield
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
