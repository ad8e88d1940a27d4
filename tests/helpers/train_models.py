"""Test helpers for the trainer (``helpers.train_models``, importable from the tests: see ``tests/conftest.py``):
tiny random checkpoints of every trained architecture, written by transformers itself (float32 safetensors).
"""

from __future__ import annotations

from pathlib import Path

from quantforge.model_source import TOKENIZER_FILES

_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
ARCHS = {
    "llama": ("LlamaConfig", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                   tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(sliding_window=5, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
}


def build_tiny(arch: str, out: Path, seed: int = 0, tokenizer_from: Path | None = None) -> Path:
    """Write a random tiny ``arch`` checkpoint to ``out`` (norm weights randomized too) and return it. With
    ``tokenizer_from`` (a checkpoint folder) its tokenizer files are copied in and the vocabulary sized to it."""
    import shutil

    import torch
    import transformers

    cls_name, extra = ARCHS[arch]
    common = dict(_COMMON)
    if tokenizer_from is not None:
        common["vocab_size"] = transformers.AutoConfig.from_pretrained(tokenizer_from).vocab_size
    config = getattr(transformers, cls_name)(**common, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if arch != "gemma2" else 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.08)
    model.save_pretrained(out)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copy(Path(tokenizer_from) / name, Path(out) / name)
    return out
