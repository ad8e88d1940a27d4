"""Read GGUF files safely, and load one back as a Hugging Face state dict, dequantizing every tensor exactly with
our codecs.

:func:`open_gguf` is the one way quantforge opens a GGUF it did not just write: it walks the header against the
file's length first (every count, length, type and tensor extent), so a truncated, bit-flipped or hostile file is a
:class:`CorruptCheckpoint` before ``gguf.GGUFReader`` runs (which would otherwise loop over a huge array count or
raise untyped errors). :func:`load_hf_state_dict` is used by the ``torch`` engine of the GGUF evaluator and by
tests: the inverse of the GGUF writer (names mapped back, Q/K rows un-permuted, Gemma norms minus one).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import arch as archmod
from .arch_hparams import hf_config_from_gguf
from .errors import CorruptCheckpoint, MissingFile, UnsupportedFormat
from .formats import by_ggml_type

GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_NESTING = 3
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""Byte width of each fixed-size GGUF value type (uint8, int8, uint16, int16, uint32, int32, float32, bool,
uint64, int64, float64); 8 is a string, 9 an array."""
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class _Cursor:
    """Bounds-checked little-endian reads over the file's bytes."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def left(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise CorruptCheckpoint(f"truncated or corrupt GGUF file: {what} at byte {self.pos} needs {n:,} bytes, "
                                    f"{self.left():,} remain", path=self.path)

    def take(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def text(self, what: str) -> str:
        n = self.take("<Q", f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptCheckpoint(f"corrupt GGUF file: {what} at byte {self.pos - n} is not UTF-8",
                                    path=self.path) from exc

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        """Step over one value of GGUF type ``vtype``, checking every length against the bytes left."""
        if vtype in _SCALAR_SIZES:
            self.need(_SCALAR_SIZES[vtype], what)
            self.pos += _SCALAR_SIZES[vtype]
        elif vtype == _STRING:
            n = self.take("<Q", f"length of {what}")
            self.need(n, what)
            self.pos += n
        elif vtype == _ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise CorruptCheckpoint(f"corrupt GGUF file: {what} nests arrays deeper than {MAX_ARRAY_NESTING}",
                                        path=self.path)
            itype = self.take("<I", f"item type of {what}")
            count = self.take("<Q", f"length of {what}")
            if itype in _SCALAR_SIZES:
                self.need(count * _SCALAR_SIZES[itype], f"{count:,} items of {what}")
                self.pos += count * _SCALAR_SIZES[itype]
                return
            if itype not in (_STRING, _ARRAY):
                raise CorruptCheckpoint(f"corrupt GGUF file: {what} has unknown item type {itype}", path=self.path)
            self.need(count * (8 if itype == _STRING else 12), f"{count:,} items of {what}")
            for _ in range(count):
                self.value(itype, what, depth + 1)
        else:
            raise CorruptCheckpoint(f"corrupt GGUF file: {what} has unknown value type {vtype}", path=self.path)


def check_gguf(path: str | os.PathLike[str]) -> None:
    """Walk a GGUF file's header (metadata and tensor table) against its length without loading anything: every
    count, string length, value type, tensor type, shape and data extent must fit. Raises
    :class:`CorruptCheckpoint` (or :class:`UnsupportedFormat` for a GGUF version or byte order we do not read)."""
    import gguf

    p = Path(path)
    size = p.stat().st_size
    if size < 24:
        raise CorruptCheckpoint(f"not a GGUF file ({size} bytes, shorter than a GGUF header)", path=p)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, p)
        if bytes(buf[:4]) != b"GGUF":
            raise CorruptCheckpoint(f"not a GGUF file (starts with {bytes(buf[:4])!r}, not b'GGUF')", path=p)
        cur.pos = 4
        version = cur.take("<I", "version")
        if version not in GGUF_VERSIONS:
            raise UnsupportedFormat(f"GGUF version {version} (or a big-endian file); quantforge reads little-endian "
                                    f"GGUF versions {GGUF_VERSIONS}", path=p)
        n_tensors = cur.take("<Q", "tensor count")
        n_kv = cur.take("<Q", "metadata count")
        cur.need(n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES,
                 f"{n_kv:,} metadata entries and {n_tensors:,} tensor infos")
        keys: set[str] = set()
        alignment = DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = cur.text("metadata key")
            if key in keys:
                raise CorruptCheckpoint(f"corrupt GGUF file: metadata key {key!r} appears twice", path=p)
            keys.add(key)
            vtype = cur.take("<I", f"type of {key!r}")
            if key == "general.alignment":
                if vtype != _UINT32:
                    raise CorruptCheckpoint(f"corrupt GGUF file: general.alignment has type {vtype}, not uint32",
                                            path=p)
                alignment = cur.take("<I", key)
                if alignment == 0 or alignment & (alignment - 1):
                    raise CorruptCheckpoint(f"corrupt GGUF file: general.alignment {alignment} is not a power of 2",
                                            path=p)
                continue
            cur.value(vtype, f"metadata value {key!r}")
        tensors: list[tuple[str, list[int], int, int]] = []
        names: set[str] = set()
        for _ in range(n_tensors):
            name = cur.text("tensor name")
            if name in names:
                raise CorruptCheckpoint(f"corrupt GGUF file: tensor {name!r} appears twice", path=p)
            names.add(name)
            n_dims = cur.take("<I", f"dimension count of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise CorruptCheckpoint(f"corrupt GGUF file: tensor {name!r} has {n_dims} dimensions (at most "
                                        f"{MAX_DIMS})", path=p)
            dims = [cur.take("<Q", f"shape of tensor {name!r}") for _ in range(n_dims)]
            ttype = cur.take("<I", f"type of tensor {name!r}")
            offset = cur.take("<Q", f"data offset of tensor {name!r}")
            tensors.append((name, dims, ttype, offset))
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        for name, dims, ttype, offset in tensors:
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            except (ValueError, KeyError) as exc:
                raise CorruptCheckpoint(f"corrupt GGUF file: tensor {name!r} has unknown type id {ttype}",
                                        path=p) from exc
            n = 1
            for d in dims:
                n *= d
            if dims and dims[0] % block:
                raise CorruptCheckpoint(f"corrupt GGUF file: tensor {name!r} rows of {dims[0]} do not fill blocks of "
                                        f"{block}", path=p)
            end = data_start + offset + n // block * type_size
            if end > size:
                raise CorruptCheckpoint(f"truncated or corrupt GGUF file: tensor {name!r} ends at byte {end:,}, the "
                                        f"file has {size:,}", path=p)


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """A ``gguf.GGUFReader`` on ``path`` after :func:`check_gguf`; anything the library still rejects is a
    :class:`CorruptCheckpoint`."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise MissingFile("GGUF file not found", path=p)
    check_gguf(p)
    try:
        return gguf.GGUFReader(str(p))
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(f"not a readable GGUF file ({type(exc).__name__}: {exc})", path=p) from exc


def read_metadata(reader: Any, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Every metadata value but the BPE merges; a value that does not decode is a :class:`CorruptCheckpoint`."""
    import gguf

    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if fld.types and fld.types[0] == gguf.GGUFValueType.ARRAY and key in ("tokenizer.ggml.merges",):
            continue
        try:
            meta[key] = fld.contents()
        except (ValueError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise CorruptCheckpoint(f"metadata value {key!r} does not decode ({type(exc).__name__}: {exc})",
                                    path=path) from exc
    return meta


def dequantize_tensor(t: Any, dtype: Any = None, device: str = "cpu", use_triton: bool = False) -> Any:
    """One GGUF reader tensor -> float tensor in PyTorch shape."""
    import numpy as np
    import torch

    fmt = by_ggml_type(int(t.tensor_type))
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    raw = torch.from_numpy(np.array(t.data, copy=True).view(np.uint8)).to(device)
    rows = raw.reshape(-1, fmt.nbytes((shape[-1],)))
    if use_triton and fmt.family.value == "gguf":
        out = fmt.load_codec().dequantize_triton(rows, dtype or torch.float32)
    else:
        out = fmt.dequantize(rows, dtype or torch.float32)
    return out.reshape(shape)


def load_hf_state_dict(path: str | os.PathLike[str], dtype: Any = None, device: str = "cpu",
                       use_triton: bool | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hf_config_dict, state_dict)`` of the GGUF at ``path``, weights dequantized exactly (float32 default).

    On CUDA the Triton dequant kernels are used unless ``use_triton=False``.
    """
    import torch

    reader = open_gguf(path)
    meta = read_metadata(reader, path)
    computed = {t.name: t for t in reader.tensors if t.name in archmod.COMPUTED_TENSORS}
    try:
        cfg = hf_config_from_gguf(meta, {n: dequantize_tensor(t).tolist() for n, t in computed.items()})
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise CorruptCheckpoint(f"the GGUF metadata does not describe a model ({type(exc).__name__}: {exc})",
                                path=path) from exc
    spec = archmod.arch_for(cfg["model_type"])
    if use_triton is None:
        use_triton = str(device).startswith("cuda")
    state: dict[str, Any] = {}
    names = {t.name for t in reader.tensors}
    experts: dict[str, Any] = {}
    for t in reader.tensors:
        if t.name in computed:
            continue
        if archmod.is_expert_tensor(t.name):
            experts[t.name] = dequantize_tensor(t, torch.float32, device, use_triton)
            continue
        hf = archmod.hf_name(spec, t.name)
        if not len(t.shape) or min(int(d) for d in t.shape) < 1:
            raise CorruptCheckpoint(f"tensor {t.name!r} has shape {t.shape.tolist()}", path=path)
        w = dequantize_tensor(t, torch.float32, device, use_triton)
        heads = archmod.qk_heads(spec, hf, cfg)
        if heads is not None:
            if heads < 1 or w.shape[0] % (2 * heads):
                raise CorruptCheckpoint(f"tensor {t.name!r} has {w.shape[0]} rows, not a whole number of "
                                        f"{heads} heads", path=path)
            w = archmod.unpermute_rows(w, heads)
        if spec.norm_plus_one and t.name.endswith("norm.weight"):
            w = w - 1.0
        state[hf] = w.to(dtype) if dtype is not None else w
    try:
        fused = archmod.fuse_experts(experts)
    except KeyError as exc:
        raise CorruptCheckpoint(f"the GGUF lacks the expert tensor {exc}", path=path) from exc
    state.update({k: w.to(dtype) if dtype is not None else w for k, w in fused.items()})
    if "model.embed_tokens.weight" not in state:
        raise CorruptCheckpoint("the GGUF has no token_embd.weight tensor", path=path)
    cfg["tie_word_embeddings"] = "output.weight" not in names
    if cfg["tie_word_embeddings"]:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return cfg, state


def load_hf_model(path: str | os.PathLike[str], dtype: Any = None, device: str = "cpu") -> Any:
    """A transformers causal LM holding the GGUF's dequantized weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict, state = load_hf_state_dict(path, dtype=dtype or torch.float32, device=device)
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise CorruptCheckpoint(f"GGUF tensors do not fit the rebuilt model (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})", path=path)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}


@dataclass(frozen=True)
class ArrayValue:
    """A metadata array left unread by :func:`read_header`: its GGUF item type and item count."""

    item_type: int
    count: int

    def __str__(self) -> str:
        return f"[{self.count} items]"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF's table: ``shape`` in PyTorch order (GGUF lists dimensions innermost first)."""

    name: str
    type_id: int
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[TensorInfo]]:
    """``(metadata, tensors)`` of a GGUF from its header alone, after :func:`check_gguf`: scalars and strings
    decoded, arrays as :class:`ArrayValue` (their items are skipped, not read). Milliseconds where
    ``gguf.GGUFReader`` takes seconds on a file with a 50k-token vocabulary; for describing a file, not loading it."""
    import gguf

    p = Path(path)
    check_gguf(p)
    meta: dict[str, Any] = {}
    tensors: list[TensorInfo] = []
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, p)
        cur.pos = 8
        n_tensors = cur.take("<Q", "tensor count")
        n_kv = cur.take("<Q", "metadata count")
        for _ in range(n_kv):
            key = cur.text("metadata key")
            vtype = cur.take("<I", f"type of {key!r}")
            if vtype in _SCALAR_FORMATS:
                meta[key] = cur.take(_SCALAR_FORMATS[vtype], key)
            elif vtype == _STRING:
                meta[key] = cur.text(key)
            else:
                start = cur.pos
                item_type = cur.take("<I", key)
                count = cur.take("<Q", key)
                cur.pos = start
                cur.value(vtype, key)
                meta[key] = ArrayValue(item_type, count)
        for _ in range(n_tensors):
            name = cur.text("tensor name")
            dims = [cur.take("<Q", name) for _ in range(cur.take("<I", name))]
            ttype = cur.take("<I", name)
            cur.take("<Q", name)
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            n = 1
            for d in dims:
                n *= d
            tensors.append(TensorInfo(name, ttype, tuple(reversed(dims)), n // block * type_size))
    return meta, tensors
