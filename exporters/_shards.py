"""Sharded safetensors output shared by the bnb4 and hf16 exporters (and the merge stage), plus side files.

:func:`write_sharded` streams ``(name, tensor)`` pairs into ``model.safetensors`` (one shard) or
``model-0000i-of-0000N.safetensors``; with several shards it writes ``model.safetensors.index.json``
(``metadata.total_size`` and a sorted ``weight_map``), with one none (as transformers' ``save_pretrained``
does). Given a *layout* (the names, dtypes and shapes that will arrive, in groups that must share a shard,
such as a weight and its quantization state), each tensor is written at its final offset as it arrives and then
dropped, so peak memory is one tensor. Without a layout, tensors are buffered one shard at a time.

Inside a shard, tensors are ordered as safetensors orders them (wider dtypes first, then by name), so every
tensor is aligned to its element size. A tensor whose length is known only when it arrives (bitsandbytes'
``quant_state`` JSON bytes) is declared with ``shape=None`` and an upper bound ``max_nbytes``; such uint8 tensors
are stored after the fixed-size ones and the header, padded with spaces as the format allows, is written last.
Output bytes depend only on the input: no timestamps, fixed key order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..errors import CorruptCheckpoint, InputError, OutputError, UnsupportedFormat
from ..model_source import SIDE_FILES, ModelSource

INDEX_NAME = "model.safetensors.index.json"
T = TypeVar("T")
Progress = Callable[..., Iterable[Any]]

_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
TORCH_DTYPES = {v: k for k, v in _ST_NAMES.items()}
_DTYPE_ALIASES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "f16": torch.float16,
                  "float16": torch.float16, "half": torch.float16, "fp32": torch.float32, "f32": torch.float32,
                  "float32": torch.float32}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def identity_progress(items: Iterable[T], total: int | None = None, desc: str = "", **_: Any) -> Iterable[T]:
    """The default ``progress`` callback: no bar."""
    return items


def parse_size(size: int | str) -> int:
    """``5GB`` -> 5_000_000_000 (decimal units, as transformers), ``500MiB`` -> binary, an int -> itself."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if m is None:
            raise InputError(f"expected a size such as 500MB, 5GB or 2GiB, got {size!r}")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise InputError(f"shard size must be positive, got {size!r}")
    return value


def torch_dtype(name: str | torch.dtype, allowed: Sequence[torch.dtype] | None = None) -> torch.dtype:
    """``"bf16"``/``"fp16"``/``"fp32"`` (or a torch dtype) -> torch dtype, refusing dtypes outside ``allowed``."""
    dtype = name if isinstance(name, torch.dtype) else _DTYPE_ALIASES.get(str(name).lower())
    if dtype is None or (allowed is not None and dtype not in allowed):
        valid = sorted(k for k, v in _DTYPE_ALIASES.items() if allowed is None or v in allowed)
        raise UnsupportedFormat(f"unsupported dtype {name!r}; expected one of {', '.join(valid)}")
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    """One tensor that will arrive: ``shape=None`` means 1-D uint8 of at most ``max_nbytes`` bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...] | None
    max_nbytes: int = 0

    @property
    def nbytes(self) -> int:
        if self.shape is None:
            return self.max_nbytes
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def checked(name: str, t: torch.Tensor, dtype: torch.dtype | None, path: object = None) -> torch.Tensor:
    """``t`` cast to ``dtype`` (floats only); NaN/Inf in the source is a :class:`CorruptCheckpoint` naming it."""
    if not t.is_floating_point():
        return t
    if not _finite(t):
        raise CorruptCheckpoint(f"tensor {name!r} holds NaN or Inf values; fix or re-export the checkpoint",
                                path=path)
    if dtype is None or dtype == t.dtype:
        return t
    out = t.to(dtype)
    if not _finite(out):
        raise InputError(f"tensor {name!r} has values outside the {dtype} range; use bf16 instead", path=path)
    return out


def _finite(t: torch.Tensor) -> bool:
    """NaN propagates through min/max and Inf is an extreme: one fast pass instead of ``isfinite().all()``."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


class _ShardFile:
    """One safetensors file whose layout is fixed up front; tensors are written at their offsets as they come."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec]) -> None:
        self.path = path
        fixed = sorted((s for s in specs if s.shape is not None), key=lambda s: (-s.dtype.itemsize, s.name))
        self.variable = {s.name: s for s in specs if s.shape is None}
        if any(s.dtype.itemsize != 1 for s in self.variable.values()):
            raise OutputError("variable-length tensors must be 1-byte types", path=path)
        self.entries: dict[str, dict[str, Any]] = {}
        off = 0
        for s in fixed:
            self.entries[s.name] = {"dtype": _ST_NAMES[s.dtype], "shape": list(s.shape),
                                    "data_offsets": [off, off + s.nbytes]}
            off += s.nbytes
        self.end = off
        self.pending = {s.name for s in specs}
        bound = off + sum(s.max_nbytes for s in self.variable.values())
        worst = dict(self.entries)
        for s in self.variable.values():
            worst[s.name] = {"dtype": _ST_NAMES[s.dtype], "shape": [s.max_nbytes], "data_offsets": [bound, bound]}
        self.header_len = -(-len(self._header(worst)) // 8) * 8
        self.file = open(path, "wb")
        self.file.write(b"\0" * (8 + self.header_len))

    @staticmethod
    def _header(entries: dict[str, dict[str, Any]]) -> bytes:
        ordered = dict(sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]))
        return json.dumps({"__metadata__": {"format": "pt"}, **ordered}, separators=(",", ":")).encode("utf-8")

    def put(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        if name in self.variable:
            spec = self.variable[name]
            if t.dtype != spec.dtype or t.dim() != 1 or t.numel() > spec.max_nbytes:
                raise OutputError(f"tensor {name!r} arrived as {t.dtype} {tuple(t.shape)}, over its bound",
                                  path=self.path)
            self.entries[name] = {"dtype": _ST_NAMES[t.dtype], "shape": [t.numel()],
                                  "data_offsets": [self.end, self.end + t.numel()]}
            self.end += t.numel()
        else:
            e = self.entries[name]
            if _ST_NAMES.get(t.dtype) != e["dtype"] or list(t.shape) != e["shape"]:
                raise OutputError(f"tensor {name!r} arrived as {t.dtype} {tuple(t.shape)}, the layout said "
                                  f"{e['dtype']} {e['shape']}", path=self.path)
        self.file.seek(8 + self.header_len + self.entries[name]["data_offsets"][0])
        if t.numel():
            self.file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.pending.discard(name)

    def close(self) -> dict[str, dict[str, Any]]:
        if self.pending:
            raise OutputError(f"tensors never arrived: {sorted(self.pending)[:5]}", path=self.path)
        header = self._header(self.entries)
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.header_len) + header + b" " * (self.header_len - len(header)))
        self.file.truncate(8 + self.header_len + self.end)
        self.file.close()
        return self.entries


def _assign(layout: Sequence[Sequence[TensorSpec]], limit: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = []
    size = 0
    for group in layout:
        g = sum(s.nbytes for s in group)
        if not shards or (size + g > limit and size > 0):
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += g
    return shards


def write_sharded(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | os.PathLike[str],
                  max_shard_size: int | str = "5GB", layout: Sequence[Sequence[TensorSpec]] | None = None
                  ) -> dict[str, Any]:
    """Write ``tensors`` as safetensors shards no larger than ``max_shard_size`` (a group larger than that gets a
    shard of its own) plus the index; returns the index. ``layout``: the groups of specs that will arrive."""
    out = Path(out_dir)
    limit = parse_size(max_shard_size)
    written: list[tuple[Path, dict[str, dict[str, Any]]]] = []
    seen: set[str] = set()
    if layout is not None:
        open_files: dict[int, _ShardFile] = {}
        shards = _assign(layout, limit)
        where = {s.name: i for i, shard in enumerate(shards) for s in shard}
        try:
            for name, t in tensors:
                if name not in where or name in seen:
                    why = "repeated" if name in seen else "not in the layout"
                    raise OutputError(f"tensor {name!r} is {why}", path=out)
                seen.add(name)
                i = where[name]
                if i not in open_files:
                    open_files[i] = _ShardFile(out / f".shard-{i:05d}.partial", shards[i])
                open_files[i].put(name, t)
                if not open_files[i].pending:
                    written.append((open_files[i].path, open_files.pop(i).close()))
        finally:
            for f in open_files.values():
                f.file.close()
        if len(seen) != len(where):
            missing = sorted(set(where) - seen)
            raise OutputError(f"{len(missing)} tensors of the layout never arrived, e.g. {missing[0]!r}", path=out)
        written.sort(key=lambda w: w[0].name)
    else:
        for batch in _batches(tensors, limit, seen, out):
            specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in batch]
            f = _ShardFile(out / f".shard-{len(written):05d}.partial", specs)
            for n, t in batch:
                f.put(n, t)
            written.append((f.path, f.close()))
    return _finish(out, written)


def _batches(tensors: Iterable[tuple[str, torch.Tensor]], limit: int, seen: set[str], out: Path
             ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    batch: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in tensors:
        if name in seen:
            raise OutputError(f"tensor {name!r} is repeated", path=out)
        seen.add(name)
        nbytes = t.numel() * t.element_size()
        if batch and size + nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append((name, t))
        size += nbytes
    if batch or not seen:
        yield batch


def _finish(out: Path, written: list[tuple[Path, dict[str, dict[str, Any]]]]) -> dict[str, Any]:
    n = len(written)
    weight_map: dict[str, str] = {}
    total = 0
    for i, (path, entries) in enumerate(written, start=1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(path, out / fname)
        for name, e in entries.items():
            weight_map[name] = fname
            total += e["data_offsets"][1] - e["data_offsets"][0]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if n > 1:
        write_json(out / INDEX_NAME, index)
    return index


def write_json(path: Path, obj: Any) -> None:
    """JSON as transformers writes it (2-space indent, sorted keys, trailing newline)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_side_files(src: ModelSource, out_dir: Path) -> list[str]:
    """Copy the tokenizer files, chat template and generation config byte for byte; returns their names."""
    copied = []
    for name in SIDE_FILES:
        p = src.side_file(name)
        if p is not None:
            shutil.copyfile(p, out_dir / name)
            copied.append(name)
    return copied
