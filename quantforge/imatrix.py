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

from .errors import CorruptCheckpoint, InputError, MissingFile


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

    from .gguf_reader import open_gguf, read_metadata

    r = open_gguf(p)
    meta = read_metadata(r, p)
    if meta.get("general.type") != "imatrix":
        raise InputError("GGUF file is not an imatrix (general.type != 'imatrix')", path=p)
    datasets = meta.get("imatrix.datasets")
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise CorruptCheckpoint("GGUF imatrix lacks imatrix.datasets (a list of strings)", path=p)
    counts_kv = [meta.get(k) for k in ("imatrix.chunk_count", "imatrix.chunk_size")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts_kv):
        raise CorruptCheckpoint("GGUF imatrix lacks imatrix.chunk_count / imatrix.chunk_size (whole numbers)",
                                path=p)
    tensors = {t.name: t for t in r.tensors}
    entries: dict[str, ImatrixEntry] = {}
    for tname, t in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        base = tname[: -len(".in_sum2")]
        c = tensors.get(base + ".counts")
        if c is None:
            raise CorruptCheckpoint(f"imatrix entry {base!r} has in_sum2 but no counts", path=p)
        if {t.tensor_type, c.tensor_type} != {gguf.GGMLQuantizationType.F32} or not len(t.shape) or t.shape[0] < 1:
            raise CorruptCheckpoint(f"imatrix entry {base!r} is not float32 sums over at least one column", path=p)
        sums = np.array(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        counts = np.array(c.data, dtype=np.float32).reshape(-1)
        if len(counts) != len(sums):
            raise CorruptCheckpoint(f"imatrix entry {base!r} has {len(sums)} rows of sums but {len(counts)} counts",
                                    path=p)
        entries[base] = ImatrixEntry(sums, counts)
    return Imatrix(entries, datasets, counts_kv[0], counts_kv[1])


def _load_dat(p: Path) -> Imatrix:
    import mmap

    import numpy as np

    if p.stat().st_size == 0:
        raise CorruptCheckpoint("empty file; expected an imatrix (GGUF or legacy .dat)", path=p)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _parse_dat(data, p, np)


def _parse_dat(data: Any, p: Path, np: Any) -> Imatrix:
    """The legacy layout over ``data`` (the file's bytes, memory-mapped): every length is checked against the bytes
    left before anything is allocated."""
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise CorruptCheckpoint("truncated legacy imatrix (.dat) file", path=p)
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    def text() -> str:
        nonlocal pos
        (ln,) = take("<i")
        if ln < 0 or pos + ln > len(data):
            raise CorruptCheckpoint(f"not an imatrix file (a name of {ln} bytes at byte {pos - 4})", path=p)
        pos += ln
        return bytes(data[pos - ln:pos]).decode("utf-8", errors="replace")

    (n,) = take("<i")
    if n < 0 or n * 12 > len(data):  # an entry takes at least 12 bytes
        raise CorruptCheckpoint(f"not an imatrix file (entry count {n} in {len(data)} bytes)", path=p)
    entries: dict[str, ImatrixEntry] = {}
    for _ in range(n):
        name = text()
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
            dataset = text()
    return Imatrix(entries, [dataset] if dataset else [], chunks)


def save_imatrix_gguf(imat: Imatrix, path: str | os.PathLike[str]) -> None:
    """Write ``imat`` in llama.cpp's GGUF imatrix layout (entries sorted by name, deterministic bytes), under a
    temporary name renamed into place (an existing file is replaced: the caller decides whether it may be)."""
    from .io import atomic_file

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
