"""A :class:`~quantforge.model_source.ModelSource` whose LoRA target tensors come out merged.

Every exporter streams tensors from a model source, so wrapping the base checkpoint is all a merge needs: the
GGUF writer, the bitsandbytes and the 16-bit exporters read merged tensors through :meth:`MergedSource.get`
exactly as they read plain ones, one tensor (or row chunk) at a time. A merged tensor comes out in float32 (the
GGUF quantizers take it without a 16-bit round trip; the 16-bit exporters round it once), every other tensor as
stored.

``base="original"`` adds the delta to the 16-bit weights of the checkpoint; ``base="quantized"`` adds it to the
weights as the adapter saw them in training: the checkpoint quantized to ``base_format`` (NF4 by default, with
bitsandbytes' double quantization) and dequantized.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
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
    _cache: OrderedDict[str, Any] = field(default_factory=OrderedDict, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open_merged(cls, model: str | os.PathLike[str], adapter: str | os.PathLike[str] | LoraAdapter,
                    base: str = "original", base_format: str = "nf4", double_quant: bool = True,
                    device: str = "cpu") -> MergedSource:
        """Open ``model``, load ``adapter`` and check that every adapter module fits the checkpoint."""
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
        return cls(path=src.path, config=src.config, tensors=src.tensors, adapter=lora, base=base,
                   base_format=base_format, double_quant=double_quant, device=device)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> Any:
        lora = self.adapter
        if lora is not None and name in lora.replacements and name not in lora.modules:
            t = lora.replacements[name]
            return t if rows is None else t[rows[0]:rows[1]]
        if lora is None or name not in lora.modules:
            return super().get(name, rows)
        merged = self._merged(name)
        return merged if rows is None else merged[rows[0]:rows[1]]

    def _merged(self, name: str) -> Any:
        """The whole merged tensor in float32 (the last few are kept: row chunks of one tensor arrive in turn)."""
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
        w = (super().get(name) if base is None else base).to(self.device)  # NaN/Inf: the exporters' checks
        if self.base == "quantized":
            qw = QuantWeight.quantize(w.to(torch.float32), self.base_format, double_quant=self.double_quant)
        else:
            fmt = {torch.bfloat16: "bf16", torch.float16: "f16"}.get(w.dtype, "f32")
            qw = QuantWeight(fmt, w if fmt != "f32" else w.to(torch.float32), (int(w.shape[0]), int(w.shape[1])))
        a, b = mod.linear_factors()
        return merge_weight(qw, a.to(self.device), b.to(self.device), mod.scale, torch.float32).cpu()
