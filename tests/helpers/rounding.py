"""Random linear layers and a tiny Llama checkpoint for the rounding tests."""

from __future__ import annotations

from pathlib import Path

import torch


def correlated_layer(n: int, rows: int = 16, tokens: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight ``(rows, n)`` and inputs ``(tokens, n)`` whose columns are correlated and unevenly scaled (as
    transformer activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 2.0 * torch.randn(n, n, generator=g) / n ** 0.5
    x = (torch.randn(tokens, n, generator=g) @ mix) * torch.exp(torch.randn(n, generator=g))
    w = torch.randn(rows, n, generator=g) * 0.02
    return w, x


def tiny_llama(out: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer bf16 Llama with 256-wide rows (so the K types apply), random weights (norms near 1) and the
    tokenizer files of ``tokenizer_dir``, saved to ``out``."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) * 0.5 + 0.75 if "norm" in name else torch.randn_like(p) * 0.1)
    model.to(torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out
