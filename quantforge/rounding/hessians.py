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

Calibration streams the file (:func:`hessian_writer`): each group's matrices go to disk as soon as the group is
complete, so memory holds one layer's statistics however large the model (an 8B Llama's sequential file is 33 GB).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import CorruptCheckpoint, InternalError, MissingFile

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


_DTYPES = {"torch.float32": "F32", "torch.float16": "F16"}


class HessianWriter:
    """Writes a hessians file one group at a time (:func:`hessian_writer` opens it).

    A safetensors file puts its JSON header, with every tensor's byte offsets, before the data. The writer reserves
    room for the header from the weight names the file may hold (a bound on what their JSON can take), writes each
    tensor after that room as it comes, and fills the header in last, padded with spaces as the format allows."""

    def __init__(self, f: IO[bytes], names: Iterable[str]) -> None:
        self._f = f
        self._reserve = header_bound(names)
        self._entries: dict[str, dict[str, Any]] = {}
        self._at = 0
        self.finished = False
        f.seek(8 + self._reserve)

    def _write(self, name: str, t: Any) -> None:
        if name in self._entries:
            raise InternalError(f"input statistics {name!r} written twice")
        t = t.detach().contiguous().cpu()
        data = t.numpy().data.cast("B")
        self._f.write(data)
        self._entries[name] = {"dtype": _DTYPES[str(t.dtype)], "shape": list(t.shape),
                               "data_offsets": [self._at, self._at + len(data)]}
        self._at += len(data)

    def add_group(self, group: str, h: Any, correction: Any = None) -> None:
        """Write group ``group``'s ``H`` (``(n, n)``, or already :func:`pack_upper`-ed) as its float32 upper triangle,
        and its sequential correction ``D`` as float16 when given."""
        self._write(group, (h if h.dim() == 1 else pack_upper(h)).float())
        if correction is not None:
            self._write(CORRECTION + group, correction.half())

    def finish(self, members: dict[str, str], tokens: dict[str, int], key: str, types: dict[str, str] | None = None,
               mode: str | None = None) -> None:
        """Write the header: ``members`` maps weight -> group; a sequential file (``mode`` given) adds the
        ``types`` and rounding ``mode`` its statistics were made for."""
        meta: dict[str, Any] = {"format": "quantforge-hessians", "version": "2", "key": key,
                                "members": dict(sorted(members.items())), "tokens": dict(sorted(tokens.items()))}
        if mode is not None:
            meta.update(types=dict(sorted((types or {}).items())), mode=mode)
        # one metadata entry: the fields as sorted JSON (safetensors keeps a flat string map)
        header = {"__metadata__": {META: json.dumps(meta, sort_keys=True)}, **dict(sorted(self._entries.items()))}
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > self._reserve:
            raise InternalError(f"the hessians header needs {len(text)} bytes, {self._reserve} were reserved")
        self._f.seek(0)
        self._f.write(struct.pack("<Q", self._reserve) + text + b" " * (self._reserve - len(text)))
        self._f.flush()
        self.finished = True


def header_bound(names: Iterable[str]) -> int:
    """Bytes that hold the header of a file over weights ``names`` whatever the groups, offsets and shapes.

    Per weight the header holds at most six names (its tensor, its correction, its ``members`` entry's key and
    group, its ``tokens`` and ``types`` keys), each as long as the longest name at most, plus numbers and field names
    (under 128 bytes a name); ``json.dumps`` escapes a character to at most 12 bytes and the metadata's JSON string
    escapes that once more (at most 2x). Rounded up to 8 bytes so the data stays aligned."""
    names = list(names)
    longest = max((len(n) for n in names), default=0)
    total = 4096 + len(names) * 6 * (2 * (12 * longest + 2) + 128)
    return (total + 7) // 8 * 8


@contextlib.contextmanager
def hessian_writer(path: str | os.PathLike[str], names: Iterable[str]) -> Iterator[HessianWriter]:
    """Open ``path`` for a :class:`HessianWriter` over weights ``names`` (a temporary file renamed into place once
    :meth:`HessianWriter.finish` has run; an existing file is replaced)."""
    from ..io import atomic_file

    with atomic_file(path, force=True) as tmp, open(tmp, "r+b") as f:
        writer = HessianWriter(f, names)
        yield writer
        if not writer.finished:
            raise InternalError("a hessians file was closed before its header was written")


def save_hessians(path: str | os.PathLike[str], groups: dict[str, Any], members: dict[str, str],
                  tokens: dict[str, int], key: str, corrections: dict[str, Any] | None = None,
                  types: dict[str, str] | None = None, mode: str | None = None) -> Path:
    """Write the group matrices held in memory (``{group: (n, n) tensor}``, or :func:`pack_upper`-ed 1-D tensors)
    the way calibration streams them; ``members`` maps weight -> group. A sequential file adds ``corrections``
    (``{group: D (n, n)}``, stored as float16) and the ``types`` and rounding ``mode`` they were made for."""
    with hessian_writer(path, [*members, *groups]) as w:
        for g in sorted(groups):
            w.add_group(g, groups[g], None if corrections is None else corrections.get(g))
        w.finish(members, tokens, key, types, None if corrections is None else mode or "gptq")
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
