"""A PEFT LoRA adapter as a llama.cpp GGUF adapter (``llama-cli --lora``, Ollama ``ADAPTER``).

Layout, as llama.cpp's loader reads it: ``general.type = adapter``, ``general.architecture`` = the base's GGUF
architecture, ``adapter.type = lora``, ``adapter.lora.alpha`` (float32), and for every target tensor ``T`` of the
base GGUF (``blk.3.attn_q.weight``) two tensors ``T.lora_a`` and ``T.lora_b`` holding PEFT's ``A (r, in)`` and
``B (out, r)`` unchanged in orientation (GGUF ``ne`` ``[in, r]`` and ``[r, out]``). The input embedding is the one
exception: llama.cpp gathers rows of ``lora_a``, so ``token_embd.weight.lora_a`` holds ``A^T (vocab, r)``.

llama.cpp scales every module by ``alpha / r`` with one file-wide alpha. Where an adapter's scale differs
(rsLoRA's ``alpha / sqrt(r)``, ``alpha_pattern``), the ratio is folded into ``B``, so each module applies
exactly PEFT's ``scale * B @ A``. Rows of ``B`` for ``q_proj``/``k_proj`` are permuted as the base GGUF's
weights are (llama-architecture RoPE order).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import __version__
from .. import arch as archmod
from ..adapters import LoraAdapter
from ..arch_hparams import resolve_arch
from ..errors import UnsupportedAdapter, UnsupportedFormat
from ..io import atomic_file
from ..model_source import ModelSource

ADAPTER_TYPES = ("f32", "f16")


def lora_tensors(adapter: LoraAdapter, src: ModelSource, dtype: str = "f32") -> list[tuple[str, Any]]:
    """``(gguf_name, numpy array)`` pairs of the adapter in llama.cpp's names, orientation and order."""
    import numpy as np
    import torch

    if dtype not in ADAPTER_TYPES:
        raise UnsupportedFormat(f"adapter tensor type {dtype!r} is not supported; expected one of "
                                f"{', '.join(ADAPTER_TYPES)}")
    if adapter.alpha <= 0:
        raise UnsupportedAdapter(f"lora_alpha {adapter.alpha} cannot be written: llama.cpp reads an alpha of 0 as "
                                 "'no scaling'", path=adapter.path)
    adapter.check_base(src.tensors)
    changed = sorted(n for n, t in adapter.replacements.items()
                     if n not in src.tensors or not torch.equal(t.to(torch.float32), src.get(n).to(torch.float32)))
    if changed:
        names = ", ".join(changed[:3])
        raise UnsupportedAdapter(f"modules_to_save ({names}) replaces whole tensors, which a llama.cpp LoRA adapter "
                                 "cannot carry; export a merged model instead", path=adapter.path)
    cfg = src.text_config
    spec = resolve_arch(src.model_type, cfg)
    tied = bool(cfg.get("tie_word_embeddings", src.config.get("tie_word_embeddings", False)))
    np_dtype = np.float32 if dtype == "f32" else np.float16
    out: list[tuple[str, Any]] = []
    for mod in adapter.modules.values():
        if mod.weight == "lm_head.weight" and (tied or spec.drop_lm_head):
            raise UnsupportedAdapter("the adapter changes lm_head, which the base ties to the input embedding; "
                                     "llama.cpp cannot apply it: export a merged model instead", path=adapter.path)
        gname = archmod.gguf_name(spec, mod.weight)
        if gname is None:
            raise UnsupportedAdapter(f"adapter module {mod.module!r} has no GGUF tensor", path=adapter.path)
        fold = mod.scale * mod.rank / adapter.alpha
        b = mod.b * torch.tensor(fold, dtype=torch.float32) if fold != 1.0 else mod.b
        if mod.embedding:
            a_out, b_out = mod.a.t(), b
        else:
            heads = archmod.qk_heads(spec, mod.weight, cfg)
            a_out, b_out = mod.a, archmod.permute_rows(b, heads) if heads else b
        out.append((f"{gname}.lora_a", np.ascontiguousarray(a_out.numpy(), dtype=np_dtype)))
        out.append((f"{gname}.lora_b", np.ascontiguousarray(b_out.numpy(), dtype=np_dtype)))
    return sorted(out, key=lambda kv: (_order(kv[0]), kv[0]))


def _order(name: str) -> tuple[int, int]:
    parts = name.split(".")
    if parts[0] == "blk":
        return 1, int(parts[1])
    return (0 if parts[0] == "token_embd" else 2), 0


def export_lora_gguf(adapter: str | os.PathLike[str] | LoraAdapter, model: str | os.PathLike[str] | ModelSource,
                     output: str | os.PathLike[str], dtype: str = "f32", force: bool = False) -> Path:
    """Write ``adapter`` (a PEFT LoRA folder) as a llama.cpp GGUF adapter for the base ``model``."""
    import gguf

    lora = adapter if isinstance(adapter, LoraAdapter) else LoraAdapter.load(adapter)
    src = model if isinstance(model, ModelSource) else ModelSource.open(model)
    tensors = lora_tensors(lora, src, dtype)
    spec = resolve_arch(src.model_type, src.text_config)
    with atomic_file(output, force=force) as tmp:
        w = gguf.GGUFWriter(str(tmp), spec.gguf_arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(lora.path.name)
        w.add_quantized_by(f"quantforge {__version__}")
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha)
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        for name, arr in tensors:
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(output)
