"""Lazy access to a Hugging Face checkpoint: config, tokenizer files and safetensors tensors.

Tensors are read one at a time through ``safetensors.safe_open`` (memory-mapped), so a stage that streams
over :meth:`ModelSource.tensor_names` keeps peak memory near the largest tensor, not the model.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CorruptCheckpoint, InputError, MissingFile

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")

_TORCH_DTYPES: dict[str, Any] = {}
_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1}


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A local checkpoint folder, or a Hub repo id fetched with ``huggingface_hub.snapshot_download``."""
    p = Path(model)
    if p.is_dir():
        return p
    text = str(model)
    if p.exists():
        raise InputError("expected a checkpoint folder (with config.json and *.safetensors), got a file", path=p)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise MissingFile("no such checkpoint folder", path=p)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
    except Exception as exc:
        raise InputError(f"could not download {text!r} from the Hub ({type(exc).__name__}); pass a local folder") from exc


def _torch_dtypes() -> dict[str, Any]:
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool}


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and validate a safetensors header; a truncated or garbled file is a :class:`CorruptCheckpoint`."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpoint("not a safetensors file (shorter than its 8-byte header length)", path=path)
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CorruptCheckpoint(f"truncated or corrupt safetensors file (header says {n} bytes, file has {size})",
                                    path=path)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CorruptCheckpoint(f"unreadable safetensors header ({type(exc).__name__})", path=path) from exc
    if not isinstance(header, dict):
        raise CorruptCheckpoint("unreadable safetensors header (not a JSON object)", path=path)
    data_len = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop, numel = _check_entry(name, info, path)
        width = _ST_DTYPES.get(info["dtype"], 0)
        if width and stop - start != numel * width:
            raise CorruptCheckpoint(f"tensor {name!r} has {stop - start} bytes, its shape needs {numel * width}",
                                    path=path)
        end = max(end, stop)
    if end > data_len:
        raise CorruptCheckpoint(f"truncated safetensors file: tensors need {end} data bytes, file has {data_len}",
                                path=path)
    return header


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_entry(name: str, info: Any, path: Path) -> tuple[int, int, int]:
    """``(start, stop, numel)`` of one header entry, whose dtype, shape and byte range must be well-formed."""
    ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
          and all(_is_count(d) for d in info["shape"]) and isinstance(info.get("data_offsets"), list)
          and len(info["data_offsets"]) == 2 and all(_is_count(o) for o in info["data_offsets"])
          and info["data_offsets"][0] <= info["data_offsets"][1])
    if not ok:
        raise CorruptCheckpoint(f"bad header entry for tensor {name!r} (expected dtype, shape and data_offsets)",
                                path=path)
    numel = 1
    for d in info["shape"]:
        numel *= d
    return info["data_offsets"][0], info["data_offsets"][1], numel


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    offset: int = 0
    nbytes: int = 0


@dataclass
class ModelSource:
    """A checkpoint folder opened lazily. ``tensors`` maps names to shape/dtype/file without reading data."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, model: str | os.PathLike[str]) -> ModelSource:
        path = resolve_model(model)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise MissingFile("config.json not found in the checkpoint folder", path=path)
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CorruptCheckpoint(f"config.json is not valid JSON ({exc})", path=cfg_path) from exc
        if not isinstance(config, dict):
            raise CorruptCheckpoint("config.json is not a JSON object", path=cfg_path)
        return cls(path=path, config=config, tensors=_index_tensors(path))

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def text_config(self) -> dict[str, Any]:
        """The language-model part of the config (nested ``text_config`` for multimodal wrappers)."""
        return self.config.get("text_config") or self.config

    def side_file(self, name: str) -> Path | None:
        p = self.path / name
        return p if p.is_file() else None

    def json_file(self, name: str) -> dict[str, Any] | None:
        p = self.side_file(name)
        if p is None:
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CorruptCheckpoint(f"{name} is not valid JSON ({exc})", path=p) from exc

    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def numel(self, name: str) -> int:
        n = 1
        for d in self.tensors[name].shape:
            n *= d
        return n

    def get(self, name: str, rows: tuple[int, int] | None = None) -> Any:
        """Load one tensor (a ``torch.Tensor`` in its stored dtype), or only rows ``[start, stop)`` of it.

        Reads with ``pread`` instead of memory-mapping, so pages of tensors already processed do not stay
        resident: streaming a model keeps the process near the size of one tensor (or one row chunk).
        """
        import torch

        info = self.tensors[name]
        if not _TORCH_DTYPES:
            _TORCH_DTYPES.update(_torch_dtypes())
        dtype = _TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise CorruptCheckpoint(f"tensor {name!r} has unsupported dtype {info.dtype}", path=info.file)
        row_elems = 1
        for d in info.shape[1:]:
            row_elems *= d
        width = _ST_DTYPES[info.dtype]
        start, stop = (0, info.shape[0] if info.shape else 1) if rows is None else rows
        n_rows = stop - start
        shape = (n_rows, *info.shape[1:]) if info.shape else ()
        nbytes = n_rows * row_elems * width
        fd = self._handles.get(info.file)
        if fd is None:
            fd = os.open(info.file, os.O_RDONLY)
            self._handles[info.file] = fd
        buf = bytearray(nbytes)
        got = os.preadv(fd, [buf], info.offset + start * row_elems * width) if nbytes else 0
        if got != nbytes:
            raise CorruptCheckpoint(f"tensor {name!r} is cut short ({got} of {nbytes} bytes)", path=info.file)
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, Any]]:
        for name in names if names is not None else self.tensor_names():
            yield name, self.get(name)

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()

    def fingerprint(self) -> str:
        """A stable hash of the config and the safetensors headers (names, shapes, dtypes, byte ranges, sizes)."""
        import hashlib

        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for f in sorted({t.file for t in self.tensors.values()}):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                h.update(fh.read(n))
        return h.hexdigest()[:16]


def _index_tensors(path: Path) -> dict[str, TensorInfo]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError) as exc:
            raise CorruptCheckpoint("model.safetensors.index.json has no valid weight_map", path=index) from exc
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f and f not in ("", ".", "..")
                                                       for f in weight_map.values()):
            raise CorruptCheckpoint("model.safetensors.index.json: weight_map must map names to shard files in "
                                    "the folder", path=index)
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise MissingFile("no *.safetensors weights in the checkpoint folder (pickled .bin is not supported)", path=path)
    out: dict[str, TensorInfo] = {}
    for fname in files:
        fpath = path / fname
        if not fpath.is_file():
            raise MissingFile("shard listed in model.safetensors.index.json is missing", path=fpath)
        header = read_safetensors_header(fpath)
        with open(fpath, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = info["data_offsets"]
            out[name] = TensorInfo(name, tuple(info["shape"]), info["dtype"], fpath, 8 + header_len + start,
                                   stop - start)
    return out
