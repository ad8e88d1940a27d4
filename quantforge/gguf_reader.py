"""Load a GGUF file back as a Hugging Face state dict, dequantizing every tensor exactly with our codecs.

Used by the ``torch`` engine of the GGUF evaluator and by tests: the inverse of :mod:`.writer` (names mapped
back, Q/K rows un-permuted, Gemma norms minus one).
"""

from __future__ import annotations

import os
from typing import Any

from ...errors import CorruptCheckpoint
from ...formats import by_ggml_type
from . import arch as archmod


def read_metadata(reader: Any) -> dict[str, Any]:
    import gguf

    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if fld.types and fld.types[0] == gguf.GGUFValueType.ARRAY and key in ("tokenizer.ggml.merges",):
            continue
        try:
            meta[key] = fld.contents()
        except Exception:
            continue
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
    import gguf
    import torch

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise CorruptCheckpoint(f"not a readable GGUF file ({exc})", path=path) from exc
    meta = read_metadata(reader)
    cfg = archmod.hf_config_from_gguf(meta)
    spec = archmod.arch_for(cfg["model_type"])
    if use_triton is None:
        use_triton = str(device).startswith("cuda")
    state: dict[str, Any] = {}
    names = {t.name for t in reader.tensors}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        hf = archmod.hf_name(spec, t.name)
        w = dequantize_tensor(t, torch.float32, device, use_triton)
        heads = archmod.qk_heads(spec, hf, cfg)
        if heads is not None:
            w = archmod.unpermute_rows(w, heads)
        if spec.norm_plus_one and t.name.endswith("norm.weight"):
            w = w - 1.0
        state[hf] = w.to(dtype) if dtype is not None else w
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
