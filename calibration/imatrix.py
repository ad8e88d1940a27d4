"""Importance matrices in llama.cpp's two file forms.

* GGUF (``general.type = imatrix``): per weight ``W``, tensors ``W.in_sum2`` (sum of squared inputs per column,
  shape ``{ne0, n_mat}``) and ``W.counts`` (``{1, n_mat}``), plus keys ``imatrix.datasets``,
  ``imatrix.chunk_count``, ``imatrix.chunk_size``.
* legacy ``.dat``: ``int32 n``, then per entry name, ``ncall`` and ``nval`` float values equal to
  ``mean(x^2) * ncall``; then ``last_chunk`` and the dataset name.

Both load to :class:`ImatrixEntry` objects whose :meth:`ImatrixEntry.mean_sq` is what quantizers use.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpoint, InputError, MissingFile


@dataclass
class ImatrixEntry:
    """Sum of squared activations per input column (``n_mat`` rows for stacked experts) and token counts."""

    in_sum2: Any  # float32 numpy (n_mat, n_per_row)
    counts: Any  # float32 numpy (n_mat,)

    def mean_sq(self) -> Any:
        """Per-column mean of squares, flattened over experts; a slice with no tokens counts as 1."""
        import numpy as np

        c = np.where(self.counts > 0, self.counts, 1.0).astype(np.float32)
        return (self.in_sum2 / c[:, None]).reshape(-1).astype(np.float32)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 512

    def for_tensor(self, name: str) -> Any | None:
        """Mean-of-squares vector for GGUF tensor ``name`` or ``None`` when the matrix has no entry."""
        e = self.entries.get(name)
        return None if e is None else e.mean_sq()


def load_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    p = Path(path)
    if not p.is_file():
        raise MissingFile("imatrix file not found", path=p)
    with open(p, "rb") as f:
        magic = f.read(4)
    imat = _load_gguf(p) if magic == b"GGUF" else _load_dat(p)
    import numpy as np

    for name, e in imat.entries.items():
        if not np.isfinite(e.in_sum2).all():
            raise CorruptCheckpoint(f"imatrix entry {name!r} has non-finite values", path=p)
    return imat


def _load_gguf(p: Path) -> Imatrix:
    import gguf
    import numpy as np

    try:
        r = gguf.GGUFReader(str(p))
    except Exception as exc:
        raise CorruptCheckpoint(f"unreadable GGUF imatrix ({exc})", path=p) from exc
    fields = r.fields
    if "general.type" not in fields or fields["general.type"].contents() != "imatrix":
        raise InputError("GGUF file is not an imatrix (general.type != 'imatrix')", path=p)
    for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"):
        if key not in fields:
            raise CorruptCheckpoint(f"GGUF imatrix lacks the required key {key}", path=p)
    tensors = {t.name: t for t in r.tensors}
    entries: dict[str, ImatrixEntry] = {}
    for tname, t in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        base = tname[: -len(".in_sum2")]
        if base + ".counts" not in tensors:
            raise CorruptCheckpoint(f"imatrix entry {base!r} has in_sum2 but no counts", path=p)
        n_per_row = int(t.shape[0])
        sums = np.array(t.data, dtype=np.float32).reshape(-1, n_per_row)
        counts = np.array(tensors[base + ".counts"].data, dtype=np.float32).reshape(-1)
        entries[base] = ImatrixEntry(sums, counts)
    return Imatrix(entries, list(fields["imatrix.datasets"].contents()), int(fields["imatrix.chunk_count"].contents()),
                   int(fields["imatrix.chunk_size"].contents()))


def _load_dat(p: Path) -> Imatrix:
    import numpy as np

    data = p.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise CorruptCheckpoint("truncated legacy imatrix (.dat) file", path=p)
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n,) = take("<i")
    if n < 0 or n > 1_000_000:
        raise CorruptCheckpoint(f"not an imatrix file (entry count {n})", path=p)
    entries: dict[str, ImatrixEntry] = {}
    for _ in range(n):
        (ln,) = take("<i")
        name = bytes(take(f"<{ln}s")[0]).decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval < 0 or pos + 4 * nval > len(data):
            raise CorruptCheckpoint(f"truncated legacy imatrix (.dat) file in entry {name!r}", path=p)
        vals = np.frombuffer(data, dtype=np.float32, count=nval, offset=pos).copy()
        pos += 4 * nval
        # stored as mean(x^2) * ncall: present it as sums over ncall "tokens"
        entries[name] = ImatrixEntry(vals.reshape(1, -1), np.array([max(ncall, 1)], dtype=np.float32))
    chunks, dataset = 0, ""
    if pos + 4 <= len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (ln,) = take("<i")
            dataset = bytes(take(f"<{ln}s")[0]).decode("utf-8", errors="replace")
    return Imatrix(entries, [dataset] if dataset else [], chunks)


def save_imatrix_gguf(imat: Imatrix, path: str | os.PathLike[str]) -> None:
    """Write ``imat`` in llama.cpp's GGUF imatrix layout (entries sorted by name, deterministic bytes), under a
    temporary name renamed into place (an existing file is replaced: the caller decides whether it may be)."""
    from ..io import atomic_file

    with atomic_file(path, force=True) as tmp:
        _write_imatrix_gguf(imat, tmp)


def _write_imatrix_gguf(imat: Imatrix, path: Path) -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", imat.datasets or ["unknown"])
    w.add_uint32("imatrix.chunk_count", int(imat.chunk_count))
    w.add_uint32("imatrix.chunk_size", int(imat.chunk_size))
    for name in sorted(imat.entries):
        e = imat.entries[name]
        w.add_tensor(name + ".in_sum2", np.ascontiguousarray(e.in_sum2, dtype=np.float32))
        w.add_tensor(name + ".counts", np.ascontiguousarray(e.counts.reshape(-1, 1), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def sum_squares(x: Any) -> Any:
    """Per-column sum of squares of the token rows of ``x`` (``[..., n]`` -> float64 ``[n]``): what
    llama-imatrix adds to ``in_sum2`` for one ``MUL_MAT`` with input ``x``."""
    rows = x.reshape(-1, x.shape[-1]).double()
    return (rows * rows).sum(0)


class ImatrixAccumulator:
    """Running ``in_sum2`` and token counts per weight, fed one matmul input at a time.

    ``names`` maps the key a hook reports (e.g. an HF module name) to the GGUF tensor name stored in the file.
    Inputs with fewer than ``min_rows`` token rows are skipped, as llama-imatrix does (it needs >= 16).
    """

    def __init__(self, names: dict[str, str], min_rows: int = 16) -> None:
        self.names = names
        self.min_rows = min_rows
        self._sums: dict[str, Any] = {}
        self._counts: dict[str, int] = {}

    def add(self, key: str, x: Any) -> None:
        n_rows = x.numel() // x.shape[-1]
        if n_rows < self.min_rows:
            return
        name = self.names[key]
        s = sum_squares(x).cpu()
        self._sums[name] = s if name not in self._sums else self._sums[name] + s
        self._counts[name] = self._counts.get(name, 0) + n_rows

    def all_reduce(self, group: Any) -> None:
        """Sum the sums and counts of every rank of ``group`` (a :class:`quantforge.distributed.Group`) into
        this accumulator, so :meth:`result` describes all ranks' inputs; float64 sums, so it equals a one-process
        run to rounding. Every rank must call it; a weight no rank saw stays absent."""
        import torch

        widths: dict[str, int] = {}
        for part in group.all_gather_object({n: int(s.numel()) for n, s in self._sums.items()}):
            widths.update(part)
        names = sorted(widths)
        sums = [self._sums.get(n, torch.zeros(widths[n], dtype=torch.float64)) for n in names]
        counts = torch.tensor([float(self._counts.get(n, 0)) for n in names], dtype=torch.float64)
        *sums, counts = group.all_reduce_sum([*sums, counts])
        self._sums = dict(zip(names, sums, strict=True))
        self._counts = {n: int(c) for n, c in zip(names, counts.tolist(), strict=True)}

    def result(self, datasets: list[str], chunk_count: int, chunk_size: int) -> Imatrix:
        import numpy as np

        entries = {name: ImatrixEntry(self._sums[name].numpy().astype(np.float32).reshape(1, -1),
                                      np.array([self._counts[name]], dtype=np.float32))
                   for name in sorted(self._sums)}
        return Imatrix(entries, list(datasets), int(chunk_count), int(chunk_size))
