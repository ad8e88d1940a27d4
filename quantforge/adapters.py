"""PEFT LoRA adapters: read ``adapter_config.json`` + ``adapter_model.safetensors`` into per-module (A, B, scale).

Any adapter PEFT's ``LoraConfig`` writes is accepted: target modules of any name, a rank per module
(``rank_pattern``, read from the tensor shapes), an alpha per module (``alpha_pattern``), rsLoRA
(``scale = alpha / sqrt(r)`` instead of ``alpha / r``), LoRA on embeddings, and ``modules_to_save`` (whole
replacement tensors; so are the ``base_layer`` weights PEFT saves beside LoRA on an embedding). Constructs
with other merge algebra (DoRA, LoRA bias, IA3, LoHa, ...) are refused with an
:class:`~quantforge.errors.UnsupportedAdapter` that names them, and an adapter whose module names or shapes do
not match the base checkpoint is an :class:`~quantforge.errors.AdapterMismatch` naming the module.

Layouts (PyTorch shapes): a Linear module ``W (out, in)`` has ``A (r, in)`` and ``B (out, r)``, and
``W' = W + scale * B @ A``; an embedding ``E (vocab, dim)`` has ``A (r, vocab)``, ``B (dim, r)`` and
``E' = E + scale * (B @ A)^T``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdapterMismatch, CorruptCheckpoint, MissingFile, UnsupportedAdapter

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")
_REFUSED_FLAGS = {"use_dora": "DoRA (use_dora: true)", "lora_bias": "LoRA bias (lora_bias: true)",
                  "fan_in_fan_out": "fan_in_fan_out (Conv1D-style transposed weights)",
                  "use_qalora": "QA-LoRA (use_qalora: true)"}


@dataclass(frozen=True)
class LoraModule:
    """The LoRA factors of one base tensor. ``a (r, in)``, ``b (out, r)`` as PEFT stores them (float32)."""

    module: str
    weight: str
    a: Any
    b: Any
    alpha: float
    scale: float
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the base tensor this module changes."""
        if self.embedding:
            return int(self.a.shape[1]), int(self.b.shape[0])
        return int(self.b.shape[0]), int(self.a.shape[1])

    def linear_factors(self) -> tuple[Any, Any]:
        """``(A, B)`` with ``delta = scale * B @ A`` in the base tensor's own ``(rows, cols)`` orientation
        (an embedding's factors are transposed and swapped)."""
        if self.embedding:
            return self.b.t().contiguous(), self.a.t().contiguous()
        return self.a, self.b


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter folder, fully loaded (adapters are small next to their base)."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    replacements: dict[str, Any] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LoraAdapter:
        """Read and validate an adapter folder; raises a typed error for anything that is not plain LoRA."""
        folder = Path(path)
        if not folder.is_dir():
            raise MissingFile("expected a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)",
                              path=folder)
        config = _read_config(folder)
        tensors = _read_tensors(folder)
        modules, replacements = _group(folder, config, tensors)
        return cls(folder, config, modules, replacements)

    def check_base(self, tensors: dict[str, Any]) -> None:
        """Every module must name a 2-D tensor of the base checkpoint with the adapter's shape; ``tensors`` maps
        base tensor names to objects with a ``shape`` (``ModelSource.tensors``)."""
        for mod in self.modules.values():
            info = tensors.get(mod.weight)
            if info is None:
                raise AdapterMismatch(f"adapter module {mod.module!r} has no base tensor {mod.weight!r}: the adapter "
                                      "was trained on another model", path=self.path)
            if tuple(info.shape) != mod.shape:
                raise AdapterMismatch(f"adapter module {mod.module!r} expects a base weight of shape "
                                      f"{list(mod.shape)}, the base has {list(info.shape)}: the adapter was "
                                      "trained on another model", path=self.path)
        for name, t in self.replacements.items():
            info = tensors.get(name)
            if info is None:
                hint = (" (the base ties it to the input embedding; untie the base first)" if name == "lm_head.weight"
                        else "")
                raise AdapterMismatch(f"modules_to_save tensor {name!r} has no counterpart in the base{hint}",
                                      path=self.path)
            if tuple(info.shape) != tuple(t.shape):
                raise AdapterMismatch(f"modules_to_save tensor {name!r} has shape {list(t.shape)}, the base has "
                                      f"{list(info.shape)}", path=self.path)


def _read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise MissingFile(f"{CONFIG_NAME} not found: not a PEFT adapter folder", path=folder)
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(f"{CONFIG_NAME} is not valid JSON ({exc})", path=cfg_path) from exc
    if not isinstance(config, dict):
        raise CorruptCheckpoint(f"{CONFIG_NAME} must hold a JSON object", path=cfg_path)
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        raise UnsupportedAdapter(f"adapter type {config.get('peft_type')!r} is not supported; only LoRA adapters "
                                 "(peft_type LORA) can be merged or exported", path=cfg_path)
    for key, what in _REFUSED_FLAGS.items():
        if config.get(key):
            raise UnsupportedAdapter(f"{what} is not supported; train a plain LoRA adapter", path=cfg_path)
    return config


def _read_tensors(folder: Path) -> dict[str, Any]:
    import torch

    for name in WEIGHT_NAMES:
        p = folder / name
        if not p.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(p)
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CorruptCheckpoint(f"unreadable adapter weights ({type(exc).__name__}: {exc})", path=p) from exc
    raise MissingFile(f"no adapter weights ({' or '.join(WEIGHT_NAMES)})", path=folder)


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override lookup: a key equal to the module name, or a regex matching its tail at a
    module boundary; the first match wins."""
    for key, value in patterns.items():
        if key == module or re.match(rf"(?:.*\.)?(?:{key})$", module):
            return value
    return default


def scale_for(config: dict[str, Any], module: str, rank: int) -> tuple[float, float]:
    """``(alpha, scale)`` of one module: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    denom = math.sqrt(rank) if config.get("use_rslora") else rank
    return alpha, alpha / denom


def _strip(name: str) -> str:
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def _group(folder: Path, config: dict[str, Any], tensors: dict[str, Any]) -> tuple[dict[str, LoraModule],
                                                                                    dict[str, Any]]:
    import torch

    parts: dict[str, dict[str, Any]] = {}
    replacements: dict[str, Any] = {}
    saved = list(config.get("modules_to_save") or [])
    for key, t in tensors.items():
        name = _strip(key)
        m = _LORA_KEY.match(name)
        if m:
            parts.setdefault(m.group("module"), {})[m.group("kind")] = t
            continue
        module = name.rsplit(".", 1)[0]
        if name.endswith(".base_layer.weight"):  # PEFT saves targeted embeddings' own weights (vocab resizing)
            replacements[name.replace(".base_layer.weight", ".weight")] = t
            continue
        if any(module.endswith(s) for s in saved):  # PEFT's own rule: a plain suffix of the module name
            replacements[name] = t
            continue
        what = ("DoRA magnitude vector" if "lora_magnitude_vector" in name else
                "LoRA bias" if ".lora_B.bias" in name or ".lora_A.bias" in name else "tensor")
        raise UnsupportedAdapter(f"adapter {what} {key!r} is not part of a plain LoRA adapter", path=folder)
    modules: dict[str, LoraModule] = {}
    for module, p in sorted(parts.items()):
        emb = "lora_embedding_A" in p or "lora_embedding_B" in p
        a, b = (p.get("lora_embedding_A"), p.get("lora_embedding_B")) if emb else (p.get("lora_A"), p.get("lora_B"))
        if a is None or b is None:
            raise CorruptCheckpoint(f"adapter module {module!r} lacks its {'A' if a is None else 'B'} factor",
                                    path=folder)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CorruptCheckpoint(f"adapter module {module!r} has factors of shapes {list(a.shape)} and "
                                    f"{list(b.shape)}; expected (r, in) and (out, r)", path=folder)
        a32, b32 = a.to(torch.float32), b.to(torch.float32)
        if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
            raise CorruptCheckpoint(f"adapter module {module!r} holds NaN/Inf values", path=folder)
        alpha, scale = scale_for(config, module, int(a.shape[0]))
        modules[f"{module}.weight"] = LoraModule(module, f"{module}.weight", a32, b32, alpha, scale, emb)
    if not modules and not replacements:
        raise CorruptCheckpoint("the adapter holds no LoRA tensors", path=folder)
    return modules, replacements
