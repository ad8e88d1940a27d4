"""The inputs' second moments ``H = XᵀX / tokens`` per linear input, as calibration saves them for error-feedback
rounding (``hessians.safetensors`` in the calibration folder).

Weights that read the same input (q/k/v of an attention block, gate/up of an MLP) share one matrix: the file
holds one float32 tensor per input group, named after the group's first weight, and its metadata maps every GGUF
weight name to its group (``members``), with the token count per group and the cache key of the run that wrote
it. ``H`` is symmetric, so version 2 stores only its upper triangle, row by row (``n (n + 1) / 2`` values: an
8B Llama's 32 layers take 16.4 GB instead of 32.7 GB); version 1 files (full matrices) still read.

A sequential calibration (``calibrate --sequential``, :mod:`quantforge.calibration.sequential`) writes the same
format as ``sequential.safetensors``: ``H`` of the inputs the *quantized* model feeds each group, plus one float16
correction matrix ``D`` per group (tensor ``correction/<group>``) that moves each weight's rounding target to
``W + W D``, and the tensor types and rounding mode the statistics were made for (metadata ``types``, ``mode``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpoint, MissingFile

FILE = "hessians.safetensors"


def pack_upper(h: Any) -> Any:
    """The upper triangle of a symmetric ``(n, n)`` matrix, row by row, as float32 ``(n (n + 1) / 2,)`` (CPU)."""
    import torch

    h = h.to(torch.float32)
    return torch.cat([h[i, i:] for i in range(h.shape[0])]).cpu()


def unpack_upper(packed: Any) -> Any:
    """The symmetric ``(n, n)`` float32 matrix whose upper triangle :func:`pack_upper` stored (row slices, not a
    boolean mask: a 14336-wide matrix unpacks in well under a second)."""
    import math

    import torch

    n = (math.isqrt(8 * packed.numel() + 1) - 1) // 2
    if n * (n + 1) // 2 != packed.numel():
        raise CorruptCheckpoint(f"{packed.numel()} values are not the upper triangle of a square matrix")
    packed = packed.to(torch.float32)
    h = torch.zeros(n, n, dtype=torch.float32, device=packed.device)
    at = 0
    for i in range(n):
        h[i, i:] = packed[at:at + n - i]
        at += n - i
    return h.add_(h.triu(1).t())


META = "quantforge"
"""The one metadata key: the file's fields as sorted JSON (files before it kept each field in its own key)."""
CORRECTION = "correction/"
"""Name prefix of a group's correction matrix in a sequential file."""


def save_hessians(path: str | os.PathLike[str], groups: dict[str, Any], members: dict[str, str],
                  tokens: dict[str, int], key: str, corrections: dict[str, Any] | None = None,
                  types: dict[str, str] | None = None, mode: str | None = None) -> Path:
    """Write the group matrices (``{group: (n, n) tensor}``, or already :func:`pack_upper`-ed 1-D tensors),
    atomically; ``members`` maps weight -> group. A sequential file adds ``corrections`` (``{group: D (n, n)}``,
    stored as float16) and the ``types`` and rounding ``mode`` they were made for."""
    from safetensors.torch import save_file

    from ..io import atomic_file

    meta = {"format": "quantforge-hessians", "version": "2", "key": key,
            "members": dict(sorted(members.items())), "tokens": dict(sorted(tokens.items()))}
    tensors = {g: (groups[g] if groups[g].dim() == 1 else pack_upper(groups[g])).float().contiguous().cpu()
               for g in sorted(groups)}
    if corrections is not None:
        meta.update(types=dict(sorted((types or {}).items())), mode=mode or "gptq")
        tensors.update({CORRECTION + g: corrections[g].half().contiguous().cpu() for g in sorted(corrections)})
    with atomic_file(path, force=True) as tmp:
        # one metadata entry: safetensors writes several in an order that changes from process to process
        save_file(tensors, str(tmp), metadata={META: json.dumps(meta, sort_keys=True)})
    return Path(path)


class Hessians:
    """Read access to a saved file: :meth:`for_tensor` loads one group's matrix when asked (bounded memory)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFile("input second moments not found; run 'quantforge calibrate ... --hessians' first",
                              path=self.path)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                self._names = set(f.keys())
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            raise CorruptCheckpoint(f"not a readable safetensors file ({exc})", path=self.path) from exc
        if META in meta:
            meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in json.loads(meta[META]).items()}
        if meta.get("format") != "quantforge-hessians":
            raise CorruptCheckpoint("not a quantforge input second-moment file", path=self.path)
        self.key = meta.get("key", "")
        self.packed = meta.get("version", "1") != "1"
        self.members: dict[str, str] = json.loads(meta.get("members", "{}"))
        self.tokens: dict[str, int] = json.loads(meta.get("tokens", "{}"))
        self.types: dict[str, str] = json.loads(meta.get("types", "{}"))
        """The tensor types a sequential file's statistics were made for (empty for plain ``XᵀX``)."""
        self.mode: str | None = meta.get("mode")

    def group_of(self, name: str) -> str | None:
        g = self.members.get(name)
        return g if g in self._names else None

    def for_tensor(self, name: str) -> Any | None:
        """``H`` ``(n, n)`` float32 (CPU) for GGUF weight ``name``, or ``None`` when calibration saw no input."""
        from safetensors import safe_open

        g = self.group_of(name)
        if g is None:
            return None
        with safe_open(str(self.path), framework="pt") as f:
            h = f.get_tensor(g)
        return unpack_upper(h) if self.packed else h

    def has_correction(self, name: str) -> bool:
        """Whether a sequential file holds a correction for GGUF weight ``name``'s group."""
        g = self.group_of(name)
        return g is not None and CORRECTION + g in self._names

    def correction_for(self, name: str) -> Any | None:
        """``D`` ``(n, n)`` float32 (CPU) of GGUF weight ``name``'s group in a sequential file, else ``None``."""
        from safetensors import safe_open

        g = self.group_of(name)
        if g is None or CORRECTION + g not in self._names:
            return None
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(CORRECTION + g).float()


def read_key(path: str | os.PathLike[str]) -> str | None:
    """The cache key recorded in a file, or ``None`` when there is no readable file."""
    try:
        return Hessians(path).key
    except (MissingFile, CorruptCheckpoint):
        return None
