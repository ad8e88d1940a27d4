"""Per-architecture knowledge for GGUF: HF -> GGUF tensor names, the Q/K row permutation, and hyper-parameters.

Supported ``model_type`` values: llama (SmolLM2, Llama 3.x), mistral (written as arch ``llama``), qwen2, qwen3
and gemma2. Everything else is an :class:`~quantforge.errors.UnsupportedArch`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ...errors import UnsupportedArch

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

_COMMON_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}
_GEMMA2_LAYER = {
    **_COMMON_LAYER,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


@dataclass(frozen=True)
class ArchSpec:
    """How one HF ``model_type`` becomes a GGUF architecture."""

    model_type: str
    gguf_arch: str
    layer_map: dict[str, str]
    permute_qk: bool = False
    norm_plus_one: bool = False
    drop_lm_head: bool = False


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "llama", _COMMON_LAYER, permute_qk=True),
    "mistral": ArchSpec("mistral", "llama", _COMMON_LAYER, permute_qk=True),
    "qwen2": ArchSpec("qwen2", "qwen2", _COMMON_LAYER),
    "qwen3": ArchSpec("qwen3", "qwen3", _COMMON_LAYER),
    "gemma2": ArchSpec("gemma2", "gemma2", _GEMMA2_LAYER, norm_plus_one=True,
                       drop_lm_head=True),
}


def arch_for(model_type: str) -> ArchSpec:
    if model_type not in ARCHS:
        raise UnsupportedArch(f"unknown model_type {model_type!r}; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[model_type]


def gguf_name(spec: ArchSpec, hf_name: str) -> str | None:
    """GGUF tensor name for an HF tensor name; ``None`` for tensors GGUF does not store (e.g. rotary caches)."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in spec.layer_map:
        return f"blk.{m.group(1)}.{spec.layer_map[m.group(2)]}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise UnsupportedArch(f"tensor {hf_name!r} has no GGUF name for model_type {spec.model_type!r}")


def hf_name(spec: ArchSpec, gguf_tensor: str) -> str:
    """Inverse of :func:`gguf_name` (used to load a GGUF back as an HF model)."""
    for k, v in _GLOBAL.items():
        if v == gguf_tensor:
            return k
    m = re.match(r"^blk\.(\d+)\.(.+)$", gguf_tensor)
    if m:
        for k, v in spec.layer_map.items():
            if v == m.group(2):
                return f"model.layers.{m.group(1)}.{k}"
    raise UnsupportedArch(f"GGUF tensor {gguf_tensor!r} has no HF name for model_type {spec.model_type!r}")


def qk_heads(spec: ArchSpec, name: str, cfg: dict[str, Any]) -> int | None:
    """Number of heads to permute rows with, for arch-``llama`` q/k projections; else ``None``."""
    if not spec.permute_qk:
        return None
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return int(cfg["num_attention_heads"])
    if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    return None


def permute_rows(w: Any, n_head: int) -> Any:
    """HF rotate-half row order -> llama.cpp's interleaved (NORM RoPE) order, per head."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_rows(w: Any, n_head: int) -> Any:
    """Inverse of :func:`permute_rows`."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The rope scaling dict of either transformers layout, or ``None`` for plain RoPE."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or params.get("type")
    return None if kind in (None, "default") else {**params, "rope_type": kind}


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def llama3_rope_freqs(cfg: dict[str, Any]) -> Any:
    """Llama 3.x long-context factors written as the ``rope_freqs.weight`` tensor (n_rot/2 values)."""
    import torch

    sc = rope_scaling(cfg) or {}
    base, dim = rope_theta(cfg), head_dim(cfg)
    factor = float(sc.get("factor", 8.0))
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def write_hparams(writer: Any, spec: ArchSpec, cfg: dict[str, Any]) -> None:
    """All ``<arch>.*`` keys llama.cpp reads for this architecture, with the types its getters expect."""
    arch = spec.gguf_arch
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hd = head_dim(cfg)
    writer.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_vocab_size(int(cfg["vocab_size"]))
    if arch == "llama":
        writer.add_rope_dimension_count(hd)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    sc = rope_scaling(cfg)
    if sc is not None and sc["rope_type"] in ("linear", "yarn"):
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if sc["rope_type"] == "linear"
                                     else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(sc["factor"]))
        if "original_max_position_embeddings" in sc:
            writer.add_rope_scaling_orig_ctx_len(int(sc["original_max_position_embeddings"]))
    if arch == "gemma2":
        if cfg.get("attn_logit_softcapping") is not None:
            writer.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
        if cfg.get("final_logit_softcapping") is not None:
            writer.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
        writer.add_sliding_window(int(cfg.get("sliding_window") or 4096))


def hf_config_from_gguf(meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the HF config keys the transformers model classes need from GGUF metadata."""
    arch = meta["general.architecture"]
    model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2"}.get(arch)
    if model_type is None:
        raise UnsupportedArch(f"cannot rebuild an HF model for GGUF architecture {arch!r}")

    def k(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    n_head = int(k("attention.head_count"))
    cfg = {
        "model_type": model_type,
        "hidden_size": int(k("embedding_length")),
        "intermediate_size": int(k("feed_forward_length")),
        "num_hidden_layers": int(k("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(k("attention.head_count_kv", n_head)),
        "max_position_embeddings": int(k("context_length")),
        "rms_norm_eps": float(k("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(k("rope.freq_base", 10000.0)),
        "vocab_size": int(k("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))),
        "head_dim": int(k("attention.key_length") or int(k("embedding_length")) // n_head),
    }
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        if f"tokenizer.ggml.{key}" in meta:
            cfg["pad_token_id" if key == "padding_token_id" else key] = int(meta[f"tokenizer.ggml.{key}"])
    if arch == "gemma2":
        cfg["attn_logit_softcapping"] = k("attn_logit_softcapping")
        cfg["final_logit_softcapping"] = k("final_logit_softcapping")
        cfg["sliding_window"] = k("attention.sliding_window")
    return cfg
