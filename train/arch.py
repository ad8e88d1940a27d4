"""Architecture description read from a Hugging Face ``config.json``: one dataclass for the five decoder
families the trainer builds (llama, mistral, qwen2, qwen3, gemma2), with the per-family switches spelled out.

Reads both the transformers 4.x spelling (``rope_theta`` / ``rope_scaling``) and the 5.x one
(``rope_parameters``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedArch

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
#: The seven projections LoRA can target, as (HF sub-module, projection) pairs.
PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ArchConfig:
    """What the decoder needs to know about one model. Shapes: hidden ``d``, heads ``h``, KV heads ``kv``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192
    act: str = "silu"
    attention_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    embed_scale: float | None = None
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    tie_embeddings: bool = False

    @property
    def scale(self) -> float:
        """Softmax scale of the attention scores."""
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def window(self, layer: int) -> int | None:
        """Sliding-window size of ``layer`` (HF rule: query ``i`` sees key ``j`` when ``i - j < window``)."""
        if self.sliding_window is None or not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    def inv_freq(self) -> Any:
        """RoPE inverse frequencies ``(head_dim / 2,)`` float32, with linear or Llama-3 scaling applied."""
        import torch

        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if self.rope_type == "linear":
            return inv / self.rope_factor
        if self.rope_type == "llama3":
            low_wavelen = self.rope_original_max_pos / self.rope_low_freq_factor
            high_wavelen = self.rope_original_max_pos / self.rope_high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.rope_factor, inv)
            smooth = (self.rope_original_max_pos / wavelen - self.rope_low_freq_factor) / (
                self.rope_high_freq_factor - self.rope_low_freq_factor)
            mid = (1 - smooth) * scaled / self.rope_factor + smooth * scaled
            is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return torch.where(is_mid, mid, scaled)
        return inv


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    if scaling:
        params = {**scaling, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    if rtype not in _ROPE_TYPES:
        raise UnsupportedArch(f"RoPE scaling {rtype!r} is not supported by the trainer; expected one of "
                              f"{', '.join(_ROPE_TYPES)}")
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rtype}
    if rtype in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rtype == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        out["rope_original_max_pos"] = int(params["original_max_position_embeddings"])
    return out


def _sliding(cfg: dict[str, Any], mt: str, n_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    window = cfg.get("sliding_window")
    if mt == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    if window is None:
        return None, (False,) * n_layers
    types = cfg.get("layer_types")
    if types:
        return int(window), tuple(t == "sliding_attention" for t in types)
    if mt == "gemma2":
        return int(window), tuple(i % 2 == 0 for i in range(n_layers))
    if mt == "qwen2":
        first_full = cfg.get("max_window_layers", n_layers)
        return int(window), tuple(i >= first_full for i in range(n_layers))
    return int(window), (True,) * n_layers


def arch_from_config(config: dict[str, Any]) -> ArchConfig:
    """An :class:`ArchConfig` from a HF ``config.json`` dict; unknown families raise :class:`UnsupportedArch`."""
    cfg = config.get("text_config") or config
    mt = str(cfg.get("model_type", config.get("model_type", "")))
    if mt not in SUPPORTED:
        raise UnsupportedArch(f"the trainer supports model_type {', '.join(SUPPORTED)}, got {mt!r}")
    act_name = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act_name not in _ACTS:
        raise UnsupportedArch(f"activation {act_name!r} is not supported by the trainer")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    n_layers = int(cfg["num_hidden_layers"])
    window, sliding = _sliding(cfg, mt, n_layers)
    gemma = mt == "gemma2"
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    return ArchConfig(
        model_type=mt, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]), num_layers=n_layers, num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), act=_ACTS[act_name],
        attention_bias=mt == "qwen2" or (mt != "mistral" and bool(cfg.get("attention_bias", False))),
        o_bias=mt not in ("qwen2", "mistral") and bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=mt == "qwen3",
        norm_offset=1.0 if gemma else 0.0, sandwich_norms=gemma,
        embed_scale=hidden ** 0.5 if gemma else None,
        attn_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5 if gemma and cfg.get("query_pre_attn_scalar") else None,
        attn_softcap=cfg.get("attn_logit_softcapping") if gemma else None,
        final_softcap=cfg.get("final_logit_softcapping") if gemma else None,
        sliding_window=window, sliding_layers=sliding,
        tie_embeddings=bool(config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", gemma))),
        **_rope(cfg),
    )
