"""The decoder the trainer runs: our own modules over packed tokens, the HF math of each supported family.

Every tensor is flat over the packed batch: hidden states ``(T, d)``, ``position_ids`` ``(T,)`` restarting at 0 per
example, :class:`~.attention.PackInfo` for the example boundaries. Projections are :class:`~.lora.LoraLinear`
(base weight in its quantized layout); norms, the embedding and an untied output head are frozen 16-bit tensors.
The per-op math comes from :mod:`quantforge.kernels` (RMSNorm, RoPE, GLU, chunked cross-entropy, offloaded
activation checkpointing).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..kernels.cross_entropy import chunked_cross_entropy
from ..kernels.glu import geglu, swiglu
from ..kernels.offload import offloaded_checkpoint
from ..kernels.rmsnorm import rms_norm
from ..kernels.rope import apply_rope
from .arch import ArchConfig
from .attention import PackInfo, packed_attention
from .lora import LoraLinear


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Attention(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int, proj: dict[str, LoraLinear], norms: dict[str, torch.Tensor]):
        super().__init__()
        self.arch, self.window = arch, arch.window(layer)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (proj[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.q_norm = _frozen(norms["q_norm"]) if arch.qk_norm else None
        self.k_norm = _frozen(norms["k_norm"]) if arch.qk_norm else None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, pack: PackInfo, inv_freq: torch.Tensor) -> torch.Tensor:
        a = self.arch
        t = x.shape[0]
        q = self.q_proj(x).view(t, a.num_heads, a.head_dim)        # (T, h, hd)
        k = self.k_proj(x).view(t, a.num_kv_heads, a.head_dim)     # (T, kv, hd)
        v = self.v_proj(x).view(t, a.num_kv_heads, a.head_dim)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, a.rms_eps)
            k = rms_norm(k, self.k_norm, a.rms_eps)
        q, k = apply_rope(q, k, pos, inv_freq=inv_freq)
        o = packed_attention(q, k, v, pack, a.scale, self.window, a.attn_softcap)
        return self.o_proj(o.reshape(t, a.num_heads * a.head_dim))


class Mlp(nn.Module):
    def __init__(self, arch: ArchConfig, proj: dict[str, LoraLinear]):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (proj[n] for n in ("gate_proj", "up_proj", "down_proj"))
        self.glu = swiglu if arch.act == "silu" else geglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.glu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block; Gemma-2 adds the post-attention / post-feed-forward ("sandwich") norms."""

    def __init__(self, arch: ArchConfig, layer: int, proj: dict[str, LoraLinear], norms: dict[str, torch.Tensor]):
        super().__init__()
        self.arch = arch
        self.self_attn = Attention(arch, layer, proj, norms)
        self.mlp = Mlp(arch, proj)
        self.input_layernorm = _frozen(norms["input_layernorm"])
        self.post_attention_layernorm = _frozen(norms["post_attention_layernorm"])
        self.pre_feedforward_layernorm = _frozen(norms["pre_feedforward_layernorm"]) if arch.sandwich_norms else None
        self.post_feedforward_layernorm = _frozen(norms["post_feedforward_layernorm"]) if arch.sandwich_norms else None

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, w, self.arch.rms_eps, self.arch.norm_offset)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, pack: PackInfo, inv_freq: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self._norm(x, self.input_layernorm), pos, pack, inv_freq)
        if self.arch.sandwich_norms:
            x = x + self._norm(h, self.post_attention_layernorm)
            h = self.mlp(self._norm(x, self.pre_feedforward_layernorm))
            return x + self._norm(h, self.post_feedforward_layernorm)
        x = x + h
        return x + self.mlp(self._norm(x, self.post_attention_layernorm))


class CausalLM(nn.Module):
    """The whole decoder. ``forward`` gives final hidden states ``(T, d)``; :meth:`loss` the summed token loss."""

    def __init__(self, arch: ArchConfig, embed: torch.Tensor, layers: list[DecoderLayer], norm: torch.Tensor,
                 lm_head: torch.Tensor | None, info: dict[str, Any]):
        super().__init__()
        self.arch = arch
        self.embed_tokens = _frozen(embed)                       # (V, d)
        self.layers = nn.ModuleList(layers)
        self.norm = _frozen(norm)
        self.lm_head = None if lm_head is None else _frozen(lm_head)
        self.register_buffer("inv_freq", arch.inv_freq().to(embed.device), persistent=False)
        self.info = info
        self.gradient_checkpointing = True

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def lora_modules(self) -> dict[str, LoraLinear]:
        """HF module name (``model.layers.N.self_attn.q_proj``) -> projection, for those carrying LoRA."""
        return {f"model.{n}": m for n, m in self.named_modules() if isinstance(m, LoraLinear) and m.has_lora}

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, pack: PackInfo) -> torch.Tensor:
        x = torch.nn.functional.embedding(input_ids, self.embed_tokens)
        if self.arch.embed_scale is not None:
            x = x * torch.tensor(self.arch.embed_scale, dtype=x.dtype)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if ckpt and i < len(self.layers) - 1:
                x = offloaded_checkpoint(functools.partial(layer, pos=position_ids, pack=pack, inv_freq=self.inv_freq),
                                         x)
            else:
                x = layer(x, position_ids, pack, self.inv_freq)
        return rms_norm(x, self.norm, self.arch.rms_eps, self.arch.norm_offset)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits ``(T, V)`` (evaluation and tests only; training never materializes them)."""
        out = hidden @ self.output_weight.t()
        cap = self.arch.final_softcap
        return out if cap is None else torch.tanh(out / cap) * cap

    def loss(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
             pack: PackInfo) -> torch.Tensor:
        """Sum of the token losses over the labels that are not -100 (divide by their count for the mean)."""
        hidden = self(input_ids, position_ids, pack)
        return chunked_cross_entropy(hidden, self.output_weight, labels, softcap=self.arch.final_softcap,
                                     reduction="sum")
