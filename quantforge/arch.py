"""Per-architecture knowledge for GGUF: HF -> GGUF tensor names, the Q/K row permutation, mixture-of-experts
stacking, and the config variants llama.cpp can run.

Supported ``model_type`` values: llama (SmolLM2, Llama 3.x), mistral and mixtral (written as arch ``llama``),
qwen2, qwen3, qwen3_moe, phi3 (Phi-3, Phi-3.5, Phi-4), gemma2, gemma3 and gemma3_text. Everything else is an
:class:`~quantforge.errors.UnsupportedArch`; so is a config of a supported type that uses a variant llama.cpp
would run differently (the error names the config field). Hyper-parameter keys live in :mod:`.arch_hparams`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedArch

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# one expert's projection (Mixtral ``w1/w2/w3``, Qwen-MoE ``*_proj``) or all experts stacked in one 3-D tensor
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_STACKED = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)"
                      r"(?:\.weight)?$")
_EXPERT_PROJ = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps", "w3": "ffn_up_exps",
                "down_proj": "ffn_down_exps", "w2": "ffn_down_exps"}
# multimodal wrappers keep the language model under a prefix; the text model's names are what GGUF maps
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_VISION_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
                    "vision_model.")

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
_MOE_LAYER = {**{k: v for k, v in _COMMON_LAYER.items() if not k.startswith("mlp.")},
              "mlp.gate.weight": "ffn_gate_inp.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight"}
# Phi-3 keeps q/k/v in one matrix (rows q, k, v) and gate/up in one (rows gate, up): llama.cpp stores both as they are
_PHI3_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
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
    experts_key: str | None = None
    skip_prefixes: tuple[str, ...] = ()


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "llama", _COMMON_LAYER, permute_qk=True),
    "mistral": ArchSpec("mistral", "llama", _COMMON_LAYER, permute_qk=True),
    "mixtral": ArchSpec("mixtral", "llama", _MOE_LAYER, permute_qk=True, experts_key="num_local_experts"),
    "qwen2": ArchSpec("qwen2", "qwen2", _COMMON_LAYER),
    "qwen3": ArchSpec("qwen3", "qwen3", _COMMON_LAYER),
    "qwen3_moe": ArchSpec("qwen3_moe", "qwen3moe", _MOE_LAYER, experts_key="num_experts"),
    "phi3": ArchSpec("phi3", "phi3", _PHI3_LAYER),
    "gemma2": ArchSpec("gemma2", "gemma2", _GEMMA2_LAYER, norm_plus_one=True, drop_lm_head=True),
    "gemma3": ArchSpec("gemma3", "gemma3", _GEMMA2_LAYER, norm_plus_one=True, drop_lm_head=True,
                       skip_prefixes=_VISION_PREFIXES),
    "gemma3_text": ArchSpec("gemma3_text", "gemma3", _GEMMA2_LAYER, norm_plus_one=True, drop_lm_head=True),
}


def arch_for(model_type: str) -> ArchSpec:
    if model_type not in ARCHS:
        raise UnsupportedArch(f"unknown model_type {model_type!r}; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[model_type]


def text_name(spec: ArchSpec, hf_name: str) -> str | None:
    """The text model's name of a checkpoint tensor (multimodal prefixes removed); ``None`` for a tensor of a
    tower GGUF does not hold (Gemma 3's vision tower and projector go to a separate mmproj file)."""
    if spec.skip_prefixes and hf_name.startswith(spec.skip_prefixes):
        return None
    for prefix, repl in _TEXT_PREFIXES:
        if hf_name.startswith(prefix):
            return repl + hf_name[len(prefix):]
    return hf_name


def gguf_name(spec: ArchSpec, hf_name: str) -> str | None:
    """GGUF tensor name for an HF tensor name; ``None`` for tensors GGUF does not store (e.g. rotary caches,
    a multimodal checkpoint's vision tower). Expert tensors map to their stacked name (see :func:`expert_parts`)."""
    name = text_name(spec, hf_name)
    if name is None or name.endswith("rotary_emb.inv_freq"):
        return None
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = expert_parts(spec, name)
    if parts:
        return parts[0].gguf_name
    m = _LAYER.match(name)
    if m and m.group(2) in spec.layer_map:
        return f"blk.{m.group(1)}.{spec.layer_map[m.group(2)]}"
    raise UnsupportedArch(f"tensor {hf_name!r} has no GGUF name for model_type {spec.model_type!r}")


@dataclass(frozen=True)
class ExpertPart:
    """Where one HF tensor goes in a stacked 3-D expert tensor ``blk.N.ffn_{gate,up,down}_exps.weight``.

    ``expert`` is the slot of a one-expert tensor (``None``: the source already stacks every expert);
    ``half`` picks the gate (0) or up (1) rows of a fused ``gate_up_proj`` (``None``: all rows)."""

    gguf_name: str
    expert: int | None
    half: int | None


def expert_parts(spec: ArchSpec, name: str) -> list[ExpertPart]:
    """The stacked expert tensors an HF tensor (text-model name) feeds; empty for a non-expert tensor."""
    if spec.experts_key is None:
        return []
    m = _EXPERT.match(name)
    if m and m.group(3) in _EXPERT_PROJ:
        return [ExpertPart(f"blk.{m.group(1)}.{_EXPERT_PROJ[m.group(3)]}.weight", int(m.group(2)), None)]
    m = _STACKED.match(name)
    if m and m.group(2) == "gate_up_proj":
        return [ExpertPart(f"blk.{m.group(1)}.ffn_gate_exps.weight", None, 0),
                ExpertPart(f"blk.{m.group(1)}.ffn_up_exps.weight", None, 1)]
    if m:
        return [ExpertPart(f"blk.{m.group(1)}.ffn_down_exps.weight", None, None)]
    return []


COMPUTED_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
"""GGUF tensors computed from the config (:func:`extra_tensors`): read back into the config, not the weights."""
_GGUF_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")


def is_expert_tensor(gguf_tensor: str) -> bool:
    return _GGUF_EXPERT.match(gguf_tensor) is not None


def fuse_experts(tensors: dict[str, Any]) -> dict[str, Any]:
    """Stacked GGUF expert tensors -> the parameters of a transformers 5 MoE block: ``mlp.experts.gate_up_proj``
    (``[E, 2*ff, hidden]``, gate rows first) and ``mlp.experts.down_proj`` (``[E, hidden, ff]``) per layer."""
    import torch

    layers = sorted({int(_GGUF_EXPERT.match(n).group(1)) for n in tensors})  # type: ignore[union-attr]
    out = {}
    for i in layers:
        blk = f"blk.{i}.ffn_{{}}_exps.weight"
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat(
            [tensors[blk.format("gate")], tensors[blk.format("up")]], dim=1)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = tensors[blk.format("down")]
    return out


def n_experts(spec: ArchSpec, cfg: dict[str, Any]) -> int:
    """Routed experts per layer (0 for a dense model); transformers 5 saves Qwen3-MoE's count as
    ``num_local_experts``, the Hub's configs as ``num_experts``."""
    if spec.experts_key is None:
        return 0
    return int(cfg.get(spec.experts_key) or cfg.get("num_local_experts") or cfg.get("num_experts") or 0)


def hf_name(spec: ArchSpec, gguf_tensor: str) -> str:
    """Inverse of :func:`gguf_name` for non-expert tensors (used to load a GGUF back as an HF model)."""
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


def rope_params(cfg: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """The rope settings of one layer type, from either transformers layout (``rope_parameters``, flat or per
    layer type as Gemma 3 has it, or the older ``rope_scaling`` + ``rope_theta``)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    elif "full_attention" in params or "sliding_attention" in params:
        params = {}
    return params


def rope_theta(cfg: dict[str, Any]) -> float:
    return float(rope_params(cfg).get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The rope scaling dict of either transformers layout, or ``None`` for plain RoPE."""
    params = rope_params(cfg)
    kind = params.get("rope_type") or params.get("type")
    return None if kind in (None, "default") else {**params, "rope_type": kind}


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def rope_dims(cfg: dict[str, Any]) -> int:
    """Rotated dimensions per head (Phi-4-mini rotates only a fraction of each head)."""
    factor = rope_params(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return int(head_dim(cfg) * float(factor))


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
    for f in freqs:  # 0-d float32 tensors: the smoothing is float32 arithmetic, as in llama.cpp's converter
        wavelen = 2 * math.pi / f
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return torch.tensor(out, dtype=torch.float32)


def extra_tensors(spec: ArchSpec, cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensors computed from the config rather than read: ``rope_freqs`` (Llama 3 scaling) and Phi-3's
    LongRoPE ``rope_factors_long`` / ``rope_factors_short``; name -> shape."""
    sc = rope_scaling(cfg)
    if sc is None:
        return {}
    if spec.gguf_arch == "llama" and sc["rope_type"] == "llama3":
        return {"rope_freqs.weight": (head_dim(cfg) // 2,)}
    if spec.gguf_arch == "phi3" and sc["rope_type"] in ("longrope", "su"):
        n = rope_dims(cfg) // 2
        return {"rope_factors_long.weight": (n,), "rope_factors_short.weight": (n,)}
    return {}


def extra_tensor(name: str, cfg: dict[str, Any]) -> Any:
    """The float32 values of one :func:`extra_tensors` entry."""
    import torch

    if name == "rope_freqs.weight":
        return llama3_rope_freqs(cfg)
    sc = rope_scaling(cfg) or {}
    return torch.tensor(sc["long_factor" if name == "rope_factors_long.weight" else "short_factor"],
                        dtype=torch.float32)


def longrope_attn_factor(cfg: dict[str, Any]) -> float:
    """LongRoPE's attention (cos/sin) scale, as transformers computes it: the config's ``attention_factor``, else
    ``sqrt(1 + ln(factor) / ln(original context))`` with ``factor`` = context / original context."""
    sc = rope_scaling(cfg) or {}
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    orig = original_context(cfg)
    factor = float(sc.get("factor") or int(cfg.get("max_position_embeddings") or orig) / orig)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def original_context(cfg: dict[str, Any]) -> int:
    sc = rope_scaling(cfg) or {}
    return int(sc.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
               or cfg.get("max_position_embeddings") or 4096)


def layer_is_sliding(cfg: dict[str, Any]) -> list[bool]:
    """Per layer, whether it uses sliding-window attention (Gemma 3: ``layer_types``, else every
    ``sliding_window_pattern``-th layer is global)."""
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types:
        return [t == "sliding_attention" for t in types[:n]]
    period = int(cfg.get("sliding_window_pattern") or 6)
    return [bool((i + 1) % period) for i in range(n)]


def gemma3_query_scale(cfg: dict[str, Any]) -> float:
    """The query pre-attention scalar llama.cpp's gemma3 uses (it reads none from the file): hidden/heads for
    the 62-layer 27B, head_dim otherwise (Google's reference config)."""
    if int(cfg["num_hidden_layers"]) == 62:
        return float(int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
    return float(head_dim(cfg))
