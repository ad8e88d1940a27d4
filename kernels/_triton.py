"""Triton availability and launch helpers shared by the kernel files.

Kernel files do ``from ._triton import HAVE_TRITON, triton, tl`` and define their ``@triton.jit`` functions
under ``if HAVE_TRITON:`` at module level (jit functions must be module globals to call each other), so the
PyTorch reference codecs still work where triton is not installed. ``import quantforge`` never imports this.
On CPU the kernels run under ``TRITON_INTERPRET=1`` (how CI tests them), on CUDA natively.
"""

from __future__ import annotations

import functools
import os

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:
    triton = None
    tl = None
    HAVE_TRITON = False


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports and a launch can run (a CUDA device, or the interpreter on CPU)."""
    if not HAVE_TRITON:
        return False
    import torch

    return torch.cuda.is_available() or interpreting()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(device_type: str) -> None:
    """Raise a clear error when a Triton kernel cannot run for tensors on ``device_type``."""
    from ..errors import InputError

    if not triton_available():
        raise InputError("Triton kernels need the 'triton' package and a CUDA GPU (or TRITON_INTERPRET=1 on CPU)")
    if device_type != "cuda" and not interpreting():
        raise InputError(f"Triton kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1), got {device_type}")
