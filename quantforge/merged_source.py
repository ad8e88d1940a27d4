"""A :class:`~quantforge.model_source.ModelSource` whose LoRA target tensors come out merged.

Every exporter streams tensors from a model source, so wrapping the base checkpoint is all a merge needs: the
GGUF writer, the bitsandbytes and the 16-bit exporters read merged tensors through :meth:`MergedSource.get`
exactly as they read plain ones, one tensor (or row chunk) at a time. A merged tensor comes out in float32 (the
GGUF quantizers take it without a 16-bit round trip; the 16-bit exporters round it once), every other tensor as
stored.

``base="original"`` adds the delta to the 16-bit weights of the checkpoint; ``base="quantized"`` adds it to the
weights as the adapter saw them in training: the checkpoint quantized to ``base_format`` (NF4 by default, with
bitsandbytes' double quantization) and dequantized. With ``base_gguf`` (a GGUF file of the model, as
``quantforge train --base-gguf`` / ``--base-format gguf --plan`` trained on it) every tensor the file holds comes
from it instead, dequantized exactly (Q/K rows back in HF order, Gemma norms minus one): the merge starts from the
very weights the adapter was trained on, and a 16-bit export of it is the trained model itself.

The GGUF writer's pipeline reads through two more methods, so a merge on a GPU costs little more than a plain
export: :meth:`MergedSource.read_rows` (reader threads) hands over the checkpoint's own row bytes wherever
:meth:`MergedSource.finish_rows` (encoder, on its device) can merge them there, row chunk by row chunk: the 16-bit
base of ``base="original"`` on a GPU (``row_merge``), where the Triton merge's value of each weight does not depend
on the chunk. A merge onto a quantized or GGUF base (whose codec needs the whole tensor) and a merge on the CPU
(whose BLAS sums depend on the chunk's row count) are done tensor by tensor on ``device`` and stay there. Either way
each weight gets the value :meth:`MergedSource.get` gives it, and no float32 copy of the model exists.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .adapters import LoraAdapter
from .errors import InputError
from .model_source import ModelSource

BASES = ("original", "quantized")
_CACHE_TENSORS = 2


@dataclass
class MergedSource(ModelSource):
    """The base checkpoint with ``adapter`` merged into it (see the module docstring)."""

    adapter: LoraAdapter | None = None
    base: str = "original"
    base_format: str = "nf4"
    double_quant: bool = True
    device: str = "cpu"
    base_gguf: str | None = None
    row_merge: bool | None = None
    """Merge the 16-bit base row chunk by row chunk on the encoding device (:meth:`finish_rows`); ``None``: on a
    GPU ``device``."""
    _gguf: dict[str, Any] | None = field(default=None, repr=False)
    _factors: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    _factor_lock: Any = field(default_factory=threading.Lock, repr=False)
    _cache: OrderedDict[str, Any] = field(default_factory=OrderedDict, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open_merged(cls, model: str | os.PathLike[str], adapter: str | os.PathLike[str] | LoraAdapter,
                    base: str = "original", base_format: str = "nf4", double_quant: bool = True,
                    device: str = "cpu", base_gguf: str | os.PathLike[str] | None = None,
                    row_merge: bool | None = None) -> MergedSource:
        """Open ``model``, load ``adapter`` and check that every adapter module fits the checkpoint (and, with
        ``base_gguf``, that the GGUF holds this model's tensors)."""
        from .formats import get_format

        if base not in BASES:
            raise InputError(f"unknown merge base {base!r}; expected one of {', '.join(BASES)}")
        if base == "quantized":
            get_format(base_format)
        src = ModelSource.open(model)
        if (src.config.get("quantization_config") or {}).get("quant_method"):
            raise InputError("the base checkpoint is already quantized; merge onto its 16-bit original (use "
                             "--base quantized to merge onto the quantized weights the adapter was trained on)",
                             path=src.path)
        lora = adapter if isinstance(adapter, LoraAdapter) else LoraAdapter.load(adapter)
        lora.check_base(src.tensors)
        out = cls(path=src.path, config=src.config, tensors=src.tensors, adapter=lora, base=base,
                  base_format=base_format, double_quant=double_quant, device=device,
                  base_gguf=None if base_gguf is None else str(base_gguf), row_merge=row_merge)
        if base_gguf is not None:
            out._gguf_tensors()
        return out

    def _gguf_tensors(self) -> dict[str, Any]:
        """HF name -> reader tensor of ``base_gguf`` (opened once); shapes checked against the checkpoint."""
        if self._gguf is None:
            from . import arch as archmod
            from .errors import UnsupportedArch
            from .gguf_reader import open_gguf

            spec = archmod.arch_for(self.model_type)
            found: dict[str, Any] = {}
            for t in open_gguf(self.base_gguf).tensors:
                if t.name in archmod.COMPUTED_TENSORS or archmod.is_expert_tensor(t.name):
                    continue
                try:
                    hf = archmod.hf_name(spec, t.name)
                except UnsupportedArch:
                    continue
                shape = tuple(int(x) for x in reversed(t.shape.tolist()))
                if hf in self.tensors and shape != tuple(self.tensors[hf].shape):
                    raise InputError(f"the base GGUF's {t.name} has shape {list(shape)}, the checkpoint's {hf} "
                                     f"{list(self.tensors[hf].shape)}: it is a GGUF of another model",
                                     path=self.base_gguf)
                found[hf] = t
            missing = sorted(set(self.adapter.modules) - set(found)) if self.adapter is not None else []
            if missing:
                raise InputError(f"the base GGUF has no tensor for {missing[0]}: it is a GGUF of another model",
                                 path=self.base_gguf)
            self._gguf = found
        return self._gguf

    def _gguf_get(self, name: str) -> Any:
        """Tensor ``name`` of ``base_gguf`` in float32 and HF orientation."""
        from . import arch as archmod
        from .gguf_reader import dequantize_tensor

        w = dequantize_tensor(self._gguf_tensors()[name])
        spec = archmod.arch_for(self.model_type)
        heads = archmod.qk_heads(spec, name, self.text_config)
        if heads:
            w = archmod.unpermute_rows(w, heads)
        if spec.norm_plus_one and name.endswith("norm.weight"):
            w = w - 1.0
        return w

    def get(self, name: str, rows: tuple[int, int] | None = None) -> Any:
        lora = self.adapter
        if lora is not None and name in lora.replacements and name not in lora.modules:
            t = lora.replacements[name]
            return t if rows is None else t[rows[0]:rows[1]]
        if lora is None or name not in lora.modules:
            if self.base_gguf is not None and name in self._gguf_tensors():
                w = self._gguf_get(name)
                return w if rows is None else w[rows[0]:rows[1]]
            return super().get(name, rows)
        merged = self._merged(name)
        return (merged if rows is None else merged[rows[0]:rows[1]]).cpu()

    def _checkpoint_rows(self, name: str) -> bool:
        """Whether tensor ``name`` is the checkpoint's own (or is merged from it by :meth:`finish_rows`)."""
        lora = self.adapter
        if lora is not None and name in lora.replacements:
            return False
        if self.base_gguf is not None and name in self._gguf_tensors():
            return False
        if lora is None or name not in lora.modules:
            return True
        row_merge = str(self.device).startswith("cuda") if self.row_merge is None else self.row_merge
        return self.base == "original" and row_merge

    def read_rows(self, name: str, rows: tuple[int, int] | None, checkpoint: Callable[[], Any]) -> Any:
        """What an exporter's reader hands its encoder for rows ``rows`` of ``name`` (``None``: all of a 1-D
        tensor): ``checkpoint()`` (the rows as stored, read by the exporter) where the tensor is the checkpoint's or
        :meth:`finish_rows` merges it, else the merged rows in float32 on ``device`` or another tensor's rows."""
        if self._checkpoint_rows(name):
            return checkpoint()
        if self.adapter is not None and name in self.adapter.modules:
            merged = self._merged(name)
            return merged if rows is None else merged[rows[0]:rows[1]]
        return self.get(name, rows)

    def finish_rows(self, name: str, raw: Any, start: int, stop: int, device: str) -> Any:
        """Rows ``[start, stop)`` of ``name`` from :meth:`read_rows`, on ``device``: merged there (float32) when
        ``read_rows`` handed over the 16-bit base rows of a LoRA target, else ``raw`` as it is."""
        import torch

        from .kernels.merge import merge_weight

        lora = self.adapter
        if lora is None or name not in lora.modules or not self._checkpoint_rows(name):
            return raw
        qw = _float_weight(raw.to(device, non_blocking=True))
        a, b = self._device_factors(name, qw.data.device)
        return merge_weight(qw, a, b[start:stop], lora.modules[name].scale, torch.float32)

    def _device_factors(self, name: str, device: Any) -> tuple[Any, Any]:
        """The module's ``(A, B)`` in float32 on ``device``. Every module's factors go there at the first call, in
        one go: a copy from pageable memory waits for the device, which the encoder must not do per tensor."""
        import torch

        key = str(device)
        with self._factor_lock:
            factors = self._factors.get(key)
            if factors is None:
                factors = self._factors[key] = {
                    n: tuple(t.to(device=device, dtype=torch.float32).contiguous() for t in m.linear_factors())
                    for n, m in self.adapter.modules.items()}
        return factors[name]

    def _merged(self, name: str) -> Any:
        """The whole merged tensor in float32 on ``device`` (the last few are kept: row chunks of one tensor arrive
        in turn)."""
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None:
                self._cache.move_to_end(name)
                return hit
            merged = self._merge(name)
            self._cache[name] = merged
            while len(self._cache) > _CACHE_TENSORS:
                self._cache.popitem(last=False)
            return merged

    def _merge(self, name: str) -> Any:
        import torch

        from .kernels.merge import merge_weight
        from .kernels.qweight import QuantWeight

        mod = self.adapter.modules[name]
        base = self.adapter.replacements.get(name)
        if self.base_gguf is not None and base is None:
            base = self._gguf_get(name)
        w = (super().get(name) if base is None else base).to(self.device)  # NaN/Inf: the exporters' checks
        if self.base == "quantized" and self.base_gguf is None:
            qw = QuantWeight.quantize(w.to(torch.float32), self.base_format, double_quant=self.double_quant)
        else:
            qw = _float_weight(w)
        a, b = mod.linear_factors()
        return merge_weight(qw, a.to(self.device), b.to(self.device), mod.scale, torch.float32)


def _float_weight(w: Any) -> Any:
    """A 16/32-bit weight as the merge kernel reads it (its own dtype, or float32 for any other float)."""
    import torch

    from .kernels.qweight import QuantWeight

    fmt = {torch.bfloat16: "bf16", torch.float16: "f16"}.get(w.dtype, "f32")
    return QuantWeight(fmt, w if fmt != "f32" else w.to(torch.float32), (int(w.shape[0]), int(w.shape[1])))
