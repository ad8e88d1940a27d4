"""GGUF mixes (``q4_k_m``, ``q2_k``, ...) as named data over tensor formats, and the per-tensor rules llama.cpp's
``llama-quantize`` applies for them (which tensors get more bits, fallbacks for rows that do not fit a block).

A mix is not a format: it maps each tensor of a model to a format from :mod:`quantforge.formats`.
Pure functions of tensor names and shapes; no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UnsupportedFormat
from .formats import get_format


@dataclass(frozen=True)
class Mix:
    name: str
    base: str
    file_type: int


MIXES: dict[str, Mix] = {m.name: m for m in (
    Mix("f32", "f32", 0), Mix("f16", "f16", 1), Mix("bf16", "bf16", 32),
    Mix("q4_0", "q4_0", 2), Mix("q4_1", "q4_1", 3), Mix("q8_0", "q8_0", 7), Mix("q5_0", "q5_0", 8),
    Mix("q5_1", "q5_1", 9), Mix("q2_k", "q2_k", 10), Mix("q3_k_s", "q3_k", 11), Mix("q3_k_m", "q3_k", 12),
    Mix("q3_k_l", "q3_k", 13), Mix("q4_k_s", "q4_k", 14), Mix("q4_k_m", "q4_k", 15), Mix("q5_k_s", "q5_k", 16),
    Mix("q5_k_m", "q5_k", 17), Mix("q6_k", "q6_k", 18), Mix("iq4_nl", "iq4_nl", 25), Mix("iq4_xs", "iq4_xs", 30),
)}

FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl"}

_BLK = re.compile(r"^blk\.(\d+)\.")


def get_mix(name: str) -> Mix:
    key = name.lower()
    if key not in MIXES:
        raise UnsupportedFormat(f"unknown GGUF type {name!r}; expected one of {', '.join(MIXES)}")
    return MIXES[key]


@dataclass(frozen=True)
class ModelShape:
    """What the mix rules need to know about the model."""

    n_layer: int
    n_head: int
    n_head_kv: int
    tied_embeddings: bool
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // max(self.n_head_kv, 1)


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors llama-quantize may re-type: >= 2-D ``*.weight`` that are not norms or routers."""
    return (len(shape) >= 2 and name.endswith(".weight") and "_norm." not in name
            and "ffn_gate_inp" not in name and not name.startswith("rope_freqs"))


def use_more_bits(i: int, n: int) -> bool:
    """The half of the layers that the ``_M`` mixes give more bits (first and last eighth, every third between)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(fmt: str, n_per_row: int) -> str:
    """Type used when ``n_per_row`` is not a multiple of ``fmt``'s block size (F16 when nothing fits)."""
    if get_format(fmt).fits(n_per_row):
        return fmt
    alt = FALLBACK.get(fmt, fmt)
    return alt if get_format(alt).fits(n_per_row) else "f16"


def mix_types(mix_name: str, tensors: list[tuple[str, tuple[int, ...]]], model: ModelShape,
              has_imatrix: bool = False) -> dict[str, str]:
    """Format name for every tensor (GGUF names, PyTorch shapes) under mix ``mix_name``, as llama-quantize picks.

    Tensors are visited in the given order; callers pass them sorted by block then name, llama.cpp's order.
    Non-quantizable tensors (norms, biases, 1-D) are ``f32``.
    """
    mix = get_mix(mix_name)
    base = mix.base
    n_attn_v = sum(1 for n, _ in tensors if n.endswith("attn_v.weight") or n.endswith("attn_qkv.weight"))
    i_attn_v = 0
    out: dict[str, str] = {}
    for name, shape in tensors:
        if not quantizable(name, shape):
            out[name] = "f32"
            continue
        if get_format(base).family.value == "float":
            out[name] = base
            continue
        m = _BLK.match(name)
        layer = int(m.group(1)) if m else -1
        t = _rule(mix.name, base, name, shape, model, layer, i_attn_v, n_attn_v, has_imatrix)
        if name.endswith(("attn_v.weight", "attn_qkv.weight")):
            i_attn_v += 1
        out[name] = fallback(t, shape[-1])
    return out


def _rule(mix: str, base: str, name: str, shape: tuple[int, ...], model: ModelShape, layer: int,
          i_v: int, n_v: int, has_imatrix: bool) -> str:
    n = model.n_layer
    is_output = name == "output.weight" or (model.tied_embeddings and name == "token_embd.weight")
    if is_output:
        if not get_format(base).fits(shape[-1]):
            return "q8_0"
        return base if base == "q8_0" else "q6_k"
    if name == "token_embd.weight":
        return base
    if name.endswith(("attn_v.weight", "attn_qkv.weight")):
        t = base
        if mix == "q2_k":
            t = "q4_k" if model.n_gqa >= 4 else "q3_k"
        elif mix == "q3_k_m":
            t = "q5_k" if i_v < 2 else "q4_k"
        elif mix == "q3_k_l":
            t = "q5_k"
        elif mix in ("iq4_nl", "iq4_xs") and model.n_gqa >= 4:
            t = "q5_k"
        elif mix in ("q4_k_m", "q5_k_m") and use_more_bits(i_v, n_v):
            t = "q6_k"
        elif mix == "q4_k_s" and i_v < 4:
            t = "q5_k"
        if model.n_expert == 8:
            t = "q8_0"
        return t
    if name.endswith("attn_k.weight"):
        return "q8_0" if model.n_expert == 8 else base
    if "ffn_down" in name:
        if mix == "q2_k":
            return "q3_k"
        if mix == "q3_k_m":
            return "q5_k" if layer < n // 16 else "q4_k"
        if mix == "q3_k_l":
            return "q5_k"
        if mix == "q4_k_m":
            return "q6_k" if use_more_bits(layer, n) else base
        if layer < n // 8 and mix in ("iq4_nl", "iq4_xs") and not has_imatrix:
            return "q5_k"
        if mix == "q5_k_m" and use_more_bits(layer, n):
            return "q6_k"
        if mix == "q4_k_s" and layer < n // 8:
            return "q5_k"
        if mix in ("q4_0", "q5_0") and has_imatrix and layer < n // 8:
            return "q4_1" if mix == "q4_0" else "q5_1"
        return base
    if name.endswith("attn_output.weight"):
        if model.n_expert == 8:
            return "q5_k" if mix in ("q2_k", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq4_xs") else base
        return {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(mix, base)
    return base
