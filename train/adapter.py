"""The adapter in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``, keys as PEFT names them
(``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``), so ``peft.PeftModel.from_pretrained``
loads it on the HF model. ``quantforge_adapter.json`` beside them records the base model, its layout (format or
plan) and the training summary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptCheckpoint, InputError, MissingFile
from ..io import atomic_file
from .model import CausalLM

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_INFO = "quantforge_adapter.json"
_PREFIX = "base_model.model."


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 DTensor) matrix gathered whole; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Whole tensor ``t`` laid out as parameter ``p``: this rank's shard when ``p`` is sharded."""
    if not hasattr(p, "device_mesh"):
        return t.to(p.device, p.dtype)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)


def lora_state(model: CausalLM) -> dict[str, torch.Tensor]:
    """PEFT key -> float32 CPU tensor, for every LoRA matrix of ``model`` (of a sharded model: a collective,
    every rank calls it and gets the whole matrices)."""
    out = {}
    for name, m in model.lora_modules().items():
        out[f"{_PREFIX}{name}.lora_A.weight"] = _whole(m.lora_A.detach()).float().cpu().contiguous()
        out[f"{_PREFIX}{name}.lora_B.weight"] = _whole(m.lora_B.detach()).float().cpu().contiguous()
    return out


def load_lora_state(model: CausalLM, state: dict[str, torch.Tensor], where: object = None) -> None:
    """Copy PEFT-named LoRA tensors into ``model`` (shapes and the set of keys must match)."""
    mods = model.lora_modules()
    expected = {f"{_PREFIX}{n}.lora_{ab}.weight" for n in mods for ab in "AB"}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise InputError(f"adapter does not match the model's LoRA layout (missing {missing[:2]}, unexpected "
                         f"{extra[:2]}); check --rank / --targets", path=where)
    with torch.no_grad():
        for name, m in mods.items():
            for ab, p in (("A", m.lora_A), ("B", m.lora_B)):
                t = state[f"{_PREFIX}{name}.lora_{ab}.weight"]
                if t.shape != p.shape:
                    raise InputError(f"adapter tensor for {name}.lora_{ab} has shape {tuple(t.shape)}, the model "
                                     f"expects {tuple(p.shape)}", path=where)
                p.copy_(_like(t, p))


def peft_config(model: CausalLM) -> dict[str, Any]:
    spec = model.info["lora"]
    return {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": model.info["model"],
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layers_pattern": None, "layers_to_transform": None, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "modules_to_save": None, "peft_type": "LORA", "r": spec.rank, "rank_pattern": {}, "revision": None,
        "target_modules": sorted(spec.targets), "task_type": "CAUSAL_LM", "use_dora": False,
        "use_rslora": spec.rslora,
    }


def _write_json(path: Path, data: Any) -> None:
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_adapter(model: CausalLM, out: str | os.PathLike[str], summary: dict[str, Any] | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter files into the folder ``out`` (created if needed), each file atomically. ``state``:
    the weights from :func:`lora_state`, when already gathered (a sharded model's, on the rank that writes)."""
    from safetensors.torch import save_file

    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    with atomic_file(dest / ADAPTER_WEIGHTS, force=True) as tmp:
        save_file(lora_state(model) if state is None else state, str(tmp), metadata={"format": "pt"})
    _write_json(dest / ADAPTER_CONFIG, peft_config(model))
    info = {"base_model": model.info["model"], "layout": model.info["layout"], "dtype": model.info["dtype"],
            "architecture": model.arch.model_type, **(summary or {})}
    _write_json(dest / ADAPTER_INFO, info)
    return dest


def load_adapter(model: CausalLM, folder: str | os.PathLike[str]) -> None:
    """Load the LoRA weights of an adapter folder written by :func:`save_adapter` into ``model``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise MissingFile(f"no {ADAPTER_WEIGHTS} in the adapter folder", path=folder)
    try:
        state = load_file(str(path))
    except SafetensorError as exc:
        raise CorruptCheckpoint(f"unreadable adapter weights ({exc})", path=path) from exc
    load_lora_state(model, state, where=path)
