"""Training on a GGUF layout: the base weights held exactly as the deployed GGUF file holds them.

Two layouts, both giving every frozen tensor the trainer reads (projections, the embedding, an untied output head)
the bytes of the GGUF file, so the adapter learns against the weights llama.cpp will run:

* :class:`GgufPlanLayout`: a ``target: gguf`` plan (per-tensor types, a base mix for the rest, its recorded
  importance matrix) applied in memory with the registry quantizers, on the training device. Types are assigned
  by :func:`quantforge.tensor_layout.typed_jobs` and rows encoded in the file's row order, as
  ``quantforge quantize --plan`` does, so the bytes held equal the bytes that command writes.
* :class:`GgufFileLayout`: a GGUF file (ours or llama.cpp's) read directly; its tensor types are the layout.

llama-family Q/K projections are stored in llama.cpp's interleaved RoPE row order. Every GGUF type quantizes
rows independently, so un-permuting the packed byte rows gives the weight in HF orientation exactly as
``unpermute(dequantize(bytes))`` would. Both layouts record a SHA-256 of every quantized tensor (file orientation)
in :meth:`describe`; :func:`check_base_gguf` checks a GGUF against that record before deployment.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import arch as archmod
from ..arch_hparams import resolve_arch
from ..errors import CorruptCheckpoint, InputError, MissingFile, PlanError, UnsupportedArch, UnsupportedFormat
from ..formats import Family, by_ggml_type, get_format
from ..kernels.qweight import QuantWeight
from ..model_source import ModelSource
from ..plan import Plan

_FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
#: Config keys a GGUF must agree on with the training checkpoint to be its quantized copy.
_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def bytes_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in row-major order (as a GGUF file stores the tensor)."""
    return hashlib.sha256(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()


def _heads(spec: archmod.ArchSpec, name: str, cfg: dict[str, Any]) -> int | None:
    return archmod.qk_heads(spec, name, cfg)


def _held(fmt: str, packed: torch.Tensor, shape: tuple[int, int], heads: int | None) -> QuantWeight:
    """A QuantWeight in HF orientation from rows in file order (packed bytes, or floats for a float type)."""
    rows = archmod.unpermute_rows(packed, heads) if heads else packed
    f = get_format(fmt)
    if f.family is Family.FLOAT:
        return QuantWeight.quantize(rows, f.name)
    return QuantWeight(f.name, rows.contiguous(), shape)


def _float32(name: str, source: ModelSource, device: torch.device) -> torch.Tensor:
    """The checkpoint tensor in float32 on ``device`` (as the GGUF writer widens it); NaN/Inf are refused."""
    from ..kernels import _cpu_fast

    raw = source.get(name)
    if device.type == "cpu" and _cpu_fast.library() is not None:
        w, bad = _cpu_fast.to_float32(raw)
    else:
        w = raw.to(device=device, dtype=torch.float32)
        bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise CorruptCheckpoint(f"tensor {name!r} has {bad} NaN/Inf values", path=source.path)
    return w


def _float_rows(fmt: str, packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    f = get_format(fmt)
    if f.family is Family.FLOAT:
        return packed.to(dtype)
    return f.dequantize(packed, torch.float32).to(dtype)


@dataclass
class _Record:
    """The quantized tensors a layout handed out: GGUF name -> (type, SHA-256 of the bytes in file order)."""

    tensors: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, gguf_name: str, fmt: str, file_rows: torch.Tensor) -> None:
        self.tensors[gguf_name] = {"type": fmt, "sha256": bytes_sha256(file_rows)}

    def digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            h.update(f"{name}:{self.tensors[name]['type']}:{self.tensors[name]['sha256']}\n".encode())
        return h.hexdigest()


def plan_imatrix_path(plan: Plan, plan_path: str | os.PathLike[str] | None) -> Path | None:
    """The importance matrix the plan's calibration recorded, found as ``quantforge quantize --plan`` finds it
    (relative to the plan file, else as written); ``None`` when the plan names none."""
    recorded = (plan.calibration or {}).get("imatrix")
    if not recorded:
        return None
    bases = [Path(plan_path).parent] if plan_path is not None else []
    for candidate in [b / recorded for b in bases] + [Path(recorded)]:
        if candidate.is_file():
            return candidate
    raise MissingFile(f"the plan's imatrix {recorded!r} was not found; pass the imatrix, or delete "
                      "calibration.imatrix from the plan to quantize without one", path=plan_path)


@dataclass
class GgufPlanLayout:
    """A GGUF plan applied in memory: each tensor encoded with its plan (or base-mix) type and the plan's imatrix."""

    plan: Plan
    source: str | None = None
    imatrix: str | os.PathLike[str] | None = None
    types: dict[str, str] = field(default_factory=dict)
    record: _Record = field(default_factory=_Record)
    _gguf: dict[str, str] = field(default_factory=dict)
    _imat: Any = None
    _spec: Any = None
    _cfg: dict[str, Any] = field(default_factory=dict)

    def prepare(self, src: ModelSource) -> None:
        """Assign every GGUF tensor its type as the GGUF writer does; a plan for another model fails here."""
        from ..imatrix import load_imatrix
        from ..presets import get_mix
        from ..tensor_layout import typed_jobs

        if self.plan.target != "gguf":
            raise PlanError(f"--base-format gguf takes a gguf plan, got target {self.plan.target!r}",
                            path=self.source)
        self._spec = resolve_arch(src.model_type, src.text_config)
        self._cfg = src.text_config
        path = self.imatrix or plan_imatrix_path(self.plan, self.source)
        self.imatrix = str(path) if path is not None else None
        self._imat = load_imatrix(path) if path is not None else None
        mix = get_mix(self.plan.base_type or "f16")
        try:
            jobs = typed_jobs(src, self._spec, mix.name, self._imat is not None, self.plan.gguf_types())
        except PlanError as exc:
            hint = "; was the plan made for another model?" if "does not have" in str(exc) else ""
            raise PlanError(f"{exc}{hint}", path=self.source) from exc
        for j in jobs:
            if j.hf_name is not None and not j.segments:
                self.types[j.hf_name] = j.fmt
                self._gguf[j.hf_name] = j.gguf_name

    def _encode(self, name: str, source: ModelSource, device: torch.device) -> tuple[str, torch.Tensor, int | None]:
        fmt = get_format(self.types[name])
        gname = self._gguf[name]
        w = _float32(name, source, device)
        heads = _heads(self._spec, name, self._cfg)
        rows = archmod.permute_rows(w, heads) if heads else w
        if fmt.family is Family.FLOAT:
            packed = rows.to(_FLOAT_DTYPES[fmt.name])
        else:
            imat = None
            if self._imat is not None and fmt.takes_imatrix:
                vec = self._imat.for_tensor(gname)
                imat = None if vec is None else torch.as_tensor(vec, dtype=torch.float32).to(device)
                if imat is not None and imat.numel() != w.shape[-1]:
                    raise InputError(f"imatrix entry for {gname} has {imat.numel()} values, expected {w.shape[-1]}")
            packed = fmt.quantize(rows, imat)
        self.record.add(gname, fmt.name, packed)
        return fmt.name, packed, heads

    def weight(self, name: str, source: ModelSource, device: torch.device, dtype: torch.dtype) -> QuantWeight:
        fmt, packed, heads = self._encode(name, source, device)
        shape = (int(packed.shape[0]), int(source.shape(name)[1]))
        return _held(fmt, packed, shape, heads)

    def tensor(self, name: str, source: ModelSource, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A frozen non-projection tensor: the embedding and output head as the GGUF holds them (dequantized to
        ``dtype``), norms and biases as stored."""
        if name in ("model.embed_tokens.weight", "lm_head.weight") and name in self.types:
            fmt, packed, heads = self._encode(name, source, device)
            rows = _float_rows(fmt, packed, dtype)
            return archmod.unpermute_rows(rows, heads) if heads else rows
        return source.get(name).to(device=device, dtype=dtype)

    def describe(self) -> dict[str, Any]:
        return {"base_format": "gguf-plan", "plan_file": self.source, "plan": self.plan.to_dict(),
                "imatrix": self.imatrix, "imatrix_sha256": file_sha256(self.imatrix) if self.imatrix else None,
                "base_sha256": self.record.digest(), "tensors": dict(self.record.tensors)}


@dataclass
class GgufFileLayout:
    """A GGUF file read directly: its tensor types are the layout, its bytes the weights."""

    path: str
    record: _Record = field(default_factory=_Record)
    _reader: Any = None
    _by_hf: dict[str, Any] = field(default_factory=dict)
    _spec: Any = None
    _cfg: dict[str, Any] = field(default_factory=dict)

    def prepare(self, src: ModelSource) -> None:
        """Open the file, map its tensors to HF names, and check it is a quantized copy of ``src``'s model."""
        from ..arch_hparams import hf_config_from_gguf
        from ..gguf_reader import open_gguf, read_metadata

        self._reader = reader = open_gguf(self.path)
        for t in reader.tensors:
            try:
                by_ggml_type(int(t.tensor_type))
            except UnsupportedFormat as exc:
                raise UnsupportedFormat(f"tensor {t.name} has type {t.tensor_type.name}, which the trainer cannot "
                                        "hold (quantforge reads the types of 'quantforge quantize --type')",
                                        path=self.path) from exc
        self._spec = spec = resolve_arch(src.model_type, src.text_config)
        self._cfg = cfg = src.text_config
        meta = read_metadata(reader, self.path)
        arch = meta.get("general.architecture")
        if arch != spec.gguf_arch:
            raise InputError(f"the GGUF is a {arch!r} model, the checkpoint a {spec.gguf_arch!r} one; pass the GGUF "
                             "of this model", path=self.path)
        try:
            gcfg = hf_config_from_gguf(meta, {})
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            gcfg = {}
        for key in _SHAPE_KEYS:
            ours = cfg.get(key) if key != "num_key_value_heads" else cfg.get(key) or cfg.get("num_attention_heads")
            if key in gcfg and ours is not None and int(gcfg[key]) != int(ours):
                raise InputError(f"the GGUF has {key}={gcfg[key]}, the checkpoint {ours}: it is a GGUF of another "
                                 "model", path=self.path)
        for t in reader.tensors:
            if t.name in archmod.COMPUTED_TENSORS or archmod.is_expert_tensor(t.name):
                continue
            try:
                hf = archmod.hf_name(spec, t.name)
            except UnsupportedArch:
                continue
            self._by_hf[hf] = t
        for name, info in src.tensors.items():
            t = self._by_hf.get(name)
            if t is None:
                continue
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            if shape != tuple(info.shape):
                raise InputError(f"the GGUF's {t.name} has shape {list(shape)}, the checkpoint's {name} "
                                 f"{list(info.shape)}: it is a GGUF of another model", path=self.path)

    def _rows(self, name: str, device: torch.device) -> tuple[str, torch.Tensor, tuple[int, ...]]:
        import numpy as np

        t = self._by_hf.get(name)
        if t is None:
            raise InputError(f"the GGUF has no tensor for {name}: it is a GGUF of another model", path=self.path)
        fmt = by_ggml_type(int(t.tensor_type))
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        raw = torch.from_numpy(np.array(t.data, copy=True).view(np.uint8))
        rows = raw.reshape(-1, fmt.nbytes((shape[-1],)))
        if len(shape) == 2:
            self.record.add(t.name, fmt.name, rows)
        if fmt.family is Family.FLOAT:
            rows = fmt.dequantize(rows, torch.float32).to(_FLOAT_DTYPES[fmt.name])
        return fmt.name, rows.to(device), shape

    def weight(self, name: str, source: ModelSource, device: torch.device, dtype: torch.dtype) -> QuantWeight:
        fmt, rows, shape = self._rows(name, device)
        return _held(fmt, rows, (shape[0], shape[1]), _heads(self._spec, name, self._cfg))

    def tensor(self, name: str, source: ModelSource, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Every frozen tensor from the file: dequantized to ``dtype``, Q/K rows un-permuted, Gemma norms minus
        one (the writer's ``+1``)."""
        fmt, rows, shape = self._rows(name, device)
        out = _float_rows(fmt, rows, torch.float32).reshape(shape)
        heads = _heads(self._spec, name, self._cfg)
        if heads:
            out = archmod.unpermute_rows(out, heads)
        if self._spec.norm_plus_one and name.endswith("norm.weight"):
            out = out - 1.0
        return out.to(dtype)

    def describe(self) -> dict[str, Any]:
        return {"base_format": "gguf-file", "gguf_file": str(Path(self.path).resolve()),
                "gguf_sha256": file_sha256(self.path), "base_sha256": self.record.digest(),
                "tensors": dict(self.record.tensors)}


def check_base_gguf(layout_info: dict[str, Any], gguf_path: str | os.PathLike[str]) -> list[str]:
    """Compare a GGUF file with the base an adapter was trained on (``quantforge_adapter.json``'s ``layout``):
    the names of the recorded tensors whose type or bytes differ in the file (empty: the file is that base)."""
    from ..gguf_reader import open_gguf

    recorded = layout_info.get("tensors") or {}
    if not recorded:
        raise InputError("the adapter records no GGUF base (it was not trained with --base-format gguf or "
                         "--base-gguf)")
    import numpy as np

    found = {t.name: t for t in open_gguf(gguf_path).tensors}
    bad = []
    for name, rec in sorted(recorded.items()):
        t = found.get(name)
        if t is None or by_ggml_type(int(t.tensor_type)).name != rec["type"]:
            bad.append(name)
            continue
        data = np.array(t.data, copy=False).view(np.uint8)
        if hashlib.sha256(data.tobytes()).hexdigest() != rec["sha256"]:
            bad.append(name)
    return bad
