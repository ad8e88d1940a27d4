"""QLoRA fine-tuning on the quantized base layout.

Python API (nothing is imported until first use)::

    from quantforge.train import LoraSpec, TrainConfig, load_model, load_tokenizer, train

    cfg = TrainConfig(rank=16, max_steps=100, batch_tokens=8192)
    model = load_model("path/to/model", lora=cfg.lora_spec(), base_format="nf4")   # or plan="plan.yaml"
    # on a GGUF layout: load_model(..., base_format="gguf", plan="gguf-plan.yaml") or base_gguf="model.gguf"
    result = train(model, load_tokenizer("path/to/model"), "data.jsonl", cfg, output_dir="adapter")
    # under torchrun: init_distributed() before load_model; shard=True in train() for FSDP2
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ArchConfig": "arch", "arch_from_config": "arch",
    "LoraSpec": "lora", "LoraLinear": "lora",
    "CausalLM": "model",
    "BaseLayout": "layout", "UniformLayout": "layout", "Bnb4PlanLayout": "layout",
    "GgufPlanLayout": "gguf_base", "GgufFileLayout": "gguf_base", "check_base_gguf": "gguf_base",
    "load_model": "loading", "make_layout": "loading",
    "load_tokenizer": "data", "build_examples": "data",
    "TrainConfig": "config",
    "train": "loop", "evaluate": "loop", "TrainResult": "loop",
    "save_adapter": "adapter", "load_adapter": "adapter",
    "init_distributed": "distributed", "layer_sharder": "fsdp",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'quantforge.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)
