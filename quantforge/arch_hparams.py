"""Architecture hyper-parameters in GGUF: the ``<arch>.*`` keys llama.cpp reads (with the types its getters
expect), the config variants it cannot run, and the way back from GGUF metadata to a transformers config."""

from __future__ import annotations

from typing import Any

from .arch import (
    ArchSpec,
    arch_for,
    gemma3_query_scale,
    head_dim,
    layer_is_sliding,
    longrope_attn_factor,
    n_experts,
    original_context,
    rope_dims,
    rope_params,
    rope_scaling,
    rope_theta,
)
from .errors import UnsupportedArch


def resolve_arch(model_type: str, cfg: dict[str, Any]) -> ArchSpec:
    """The :class:`ArchSpec` of ``model_type`` after checking that ``cfg`` (the text model's config) is a variant
    llama.cpp runs as transformers does."""
    spec = arch_for(model_type)
    check_config(spec, cfg)
    return spec


def check_config(spec: ArchSpec, cfg: dict[str, Any]) -> None:
    """Refuse a config of a supported type whose variant llama.cpp would run differently from transformers, naming
    the field (a silently different model is worse than no file)."""
    def refuse(field: str, value: Any, why: str) -> None:
        raise UnsupportedArch(f"{spec.model_type} config has {field}={value!r}: {why}")

    if spec.experts_key is not None:
        n, used = n_experts(spec, cfg), int(cfg.get("num_experts_per_tok") or 0)
        if n < 2 or not 0 < used <= n:
            refuse(f"{spec.experts_key}/num_experts_per_tok", (n, used), "expected at least 2 experts and 1 to "
                   "all of them used per token")
    if spec.model_type == "qwen3_moe":
        if cfg.get("norm_topk_prob") is False:
            refuse("norm_topk_prob", False, "llama.cpp's qwen3moe always renormalizes the top-k router weights")
        if int(cfg.get("decoder_sparse_step") or 1) != 1:
            refuse("decoder_sparse_step", cfg["decoder_sparse_step"], "llama.cpp's qwen3moe makes every layer MoE")
        if cfg.get("mlp_only_layers"):
            refuse("mlp_only_layers", cfg["mlp_only_layers"], "llama.cpp's qwen3moe has no dense layers")
    if spec.experts_key is not None and cfg.get("scoring_func", "softmax") != "softmax":
        refuse("scoring_func", cfg["scoring_func"], "only softmax routing is handled")
    if spec.gguf_arch in ("llama", "qwen3moe", "phi3") and cfg.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", cfg["hidden_act"], "llama.cpp runs this architecture with SiLU")
    if spec.gguf_arch == "phi3":
        sc = rope_scaling(cfg)
        if sc is not None and sc["rope_type"] not in ("longrope", "su"):
            refuse("rope_scaling.rope_type", sc["rope_type"], "only LongRoPE (or none) is handled for phi3")
        if sc is not None and not (sc.get("long_factor") and sc.get("short_factor")):
            refuse("rope_scaling.long_factor/short_factor", None, "LongRoPE needs both factor lists")
    if spec.gguf_arch == "gemma3":
        if cfg.get("attn_logit_softcapping") is not None:
            refuse("attn_logit_softcapping", cfg["attn_logit_softcapping"], "Gemma 3 in llama.cpp has none")
        if cfg.get("use_bidirectional_attention"):
            refuse("use_bidirectional_attention", True, "an embedding model, not a causal LM")
        if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            refuse("hidden_activation", cfg["hidden_activation"], "llama.cpp's gemma3 uses tanh-approximated GELU")
        want = gemma3_query_scale(cfg)
        if cfg.get("query_pre_attn_scalar") is not None and float(cfg["query_pre_attn_scalar"]) != want:
            refuse("query_pre_attn_scalar", cfg["query_pre_attn_scalar"], f"llama.cpp's gemma3 scales queries by "
                   f"1/sqrt({want:g}) for this shape and reads no key to change it")
        sliding = rope_params(cfg, "sliding_attention")
        if (sliding.get("rope_type") or "default") != "default":
            refuse("rope_parameters.sliding_attention.rope_type", sliding["rope_type"],
                   "llama.cpp scales no local-layer RoPE")


def write_hparams(writer: Any, spec: ArchSpec, cfg: dict[str, Any]) -> None:
    """All ``<arch>.*`` keys llama.cpp reads for this architecture, with the types its getters expect."""
    import gguf

    arch = spec.gguf_arch
    key = f"{arch}."
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
    if arch in ("llama", "phi3"):
        writer.add_rope_dimension_count(rope_dims(cfg) if arch == "phi3" else hd)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    if spec.experts_key is not None:
        writer.add_expert_count(n_experts(spec, cfg))
        writer.add_expert_used_count(int(cfg["num_experts_per_tok"]))
        if cfg.get("moe_intermediate_size"):
            writer.add_uint32(key + "expert_feed_forward_length", int(cfg["moe_intermediate_size"]))
    sc = rope_scaling(cfg)
    if sc is not None and sc["rope_type"] in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if sc["rope_type"] == "linear"
                                     else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(sc["factor"]))
        if "original_max_position_embeddings" in sc:
            writer.add_rope_scaling_orig_ctx_len(int(sc["original_max_position_embeddings"]))
    if arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(original_context(cfg))
        writer.add_sliding_window(int(cfg.get("sliding_window") or 0))
        if sc is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            writer.add_float32(key + "rope.scaling.attn_factor", longrope_attn_factor(cfg))
    if arch == "gemma2":
        if cfg.get("attn_logit_softcapping") is not None:
            writer.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
        if cfg.get("final_logit_softcapping") is not None:
            writer.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
        writer.add_sliding_window(int(cfg.get("sliding_window") or 4096))
    if arch == "gemma3":
        if cfg.get("final_logit_softcapping") is not None:
            writer.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
        sliding = layer_is_sliding(cfg)
        if any(sliding):
            writer.add_sliding_window(int(cfg.get("sliding_window") or 4096))
            writer.add_array(key + "attention.sliding_window_pattern", sliding)
            local = rope_params(cfg, "sliding_attention").get("rope_theta") or cfg.get("rope_local_base_freq")
            writer.add_float32(key + "rope.freq_base_swa", float(local or 10000.0))


def hf_config_from_gguf(meta: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rebuild the HF config keys the transformers model classes need from GGUF metadata (``extra``: tensors the
    config needs, e.g. Phi-3's LongRoPE factors, as lists)."""
    arch = meta["general.architecture"]

    def k(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    n_expert = int(k("expert_count") or 0)
    model_type = {"llama": "mixtral" if n_expert else "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                  "qwen3moe": "qwen3_moe", "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3_text"}.get(arch)
    if model_type is None:
        raise UnsupportedArch(f"cannot rebuild an HF model for GGUF architecture {arch!r}")
    n_head = int(k("attention.head_count"))
    cfg: dict[str, Any] = {
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
    cfg.setdefault("pad_token_id", None)  # some classes (Phi-3) default to an id beyond a small vocabulary
    if n_expert:
        cfg["num_local_experts" if model_type == "mixtral" else "num_experts"] = n_expert
        cfg["num_experts_per_tok"] = int(k("expert_used_count"))
    if model_type == "qwen3_moe":
        cfg.update(moe_intermediate_size=int(k("expert_feed_forward_length") or cfg["intermediate_size"]),
                   norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "gemma2":
        cfg["attn_logit_softcapping"] = k("attn_logit_softcapping")
        cfg["final_logit_softcapping"] = k("final_logit_softcapping")
        cfg["sliding_window"] = k("attention.sliding_window")
    if arch == "gemma3":
        _gemma3_back(cfg, k)
    if arch == "phi3":
        _phi3_back(cfg, k, extra or {})
    return cfg


def _gemma3_back(cfg: dict[str, Any], k: Any) -> None:
    cfg["final_logit_softcapping"] = k("final_logit_softcapping")
    cfg["query_pre_attn_scalar"] = int(gemma3_query_scale(cfg))
    pattern = k("attention.sliding_window_pattern")
    n = cfg["num_hidden_layers"]
    if k("attention.sliding_window"):
        sliding = list(pattern) if isinstance(pattern, list) else [bool((i + 1) % int(pattern or 6)) for i in range(n)]
        cfg["sliding_window"] = int(k("attention.sliding_window"))
    else:
        sliding = [False] * n
    cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    if k("rope.scaling.type") == "linear":
        full.update(rope_type="linear", factor=float(k("rope.scaling.factor")))
    cfg["rope_parameters"] = {"full_attention": full, "sliding_attention": {
        "rope_type": "default", "rope_theta": float(k("rope.freq_base_swa", 10000.0))}}


def _phi3_back(cfg: dict[str, Any], k: Any, extra: dict[str, Any]) -> None:
    cfg["sliding_window"] = int(k("attention.sliding_window") or 0) or None
    cfg["original_max_position_embeddings"] = int(k("rope.scaling.original_context_length") or cfg[
        "max_position_embeddings"])
    rot = int(k("rope.dimension_count") or cfg["head_dim"])
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta"),
                              "partial_rotary_factor": rot / cfg["head_dim"]}
    if "rope_factors_long.weight" in extra:
        params.update(rope_type="longrope", long_factor=list(extra["rope_factors_long.weight"]),
                      short_factor=list(extra["rope_factors_short.weight"]),
                      original_max_position_embeddings=cfg["original_max_position_embeddings"],
                      attention_factor=float(k("rope.scaling.attn_factor", 1.0)))
    cfg["rope_parameters"] = params
