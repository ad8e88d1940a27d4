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
    Mix("iq2_xxs", "iq2_xxs", 19), Mix("iq2_xs", "iq2_xs", 20), Mix("iq1_s", "iq1_s", 24), Mix("iq1_m", "iq1_m", 31),
    Mix("iq3_xs", "iq3_s", 22), Mix("iq3_s", "iq3_s", 26), Mix("iq3_m", "iq3_s", 27),
    Mix("iq2_s", "iq2_xs", 28), Mix("iq2_m", "iq2_s", 29), Mix("iq3_xxs", "iq3_xxs", 23),
    Mix("q2_k_s", "q2_k", 21), Mix("tq1_0", "tq1_0", 36), Mix("tq2_0", "tq2_0", 37),
)}

FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl"}
FALLBACK.update({t: "iq4_nl" for t in ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s")})
FALLBACK.update({"tq1_0": "q4_0", "tq2_0": "q4_0"})

#: The 1- to 2-bit i-quant mixes, which share one rule set (``_iq_low_rule``), and the IQ3_S-based ones
#: (``_iq3_rule``).
IQ_LOW_MIXES = ("iq2_xxs", "iq2_xs", "iq1_s", "iq1_m", "iq2_s", "iq2_m")
IQ3_MIXES = ("iq3_xs", "iq3_s", "iq3_m")
#: Tensor types llama-quantize makes only with an imatrix (token_embd and output exempt).
IMATRIX_TYPES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs")
#: Types ggml's quantizers themselves cannot make without an imatrix (even for token_embd and output).
CODEC_IMATRIX_TYPES = ("iq1_s", "iq2_xxs", "iq2_xs")
#: Mixes whose tensors of one more type need an imatrix (llama-quantize: Q2_K inside a Q2_K_S file).
IMATRIX_TYPES_OF_MIX = {"q2_k_s": ("q2_k",)}

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
    if mix in IQ_LOW_MIXES:
        return _iq_low_rule(mix, base, name, shape, model, layer, is_output)
    if mix in IQ3_MIXES and not is_output:
        return _iq3_rule(mix, base, name, model, layer)
    if mix == "iq3_xxs":
        return _iq3_xxs_rule(base, name, shape, model, layer, is_output, has_imatrix)
    if is_output:
        if not get_format(base).fits(shape[-1]):
            return "q8_0"
        return base if base == "q8_0" else "q6_k"
    if name == "token_embd.weight":
        return "q4_k" if mix in ("tq1_0", "tq2_0") else base
    if name.endswith(("attn_v.weight", "attn_qkv.weight")):
        t = base
        if mix == "q2_k":
            t = "q4_k" if model.n_gqa >= 4 else "q3_k"
        elif mix == "q2_k_s" and model.n_gqa >= 4:
            t = "q4_k"
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
        if mix == "q2_k_s":
            return "q4_k" if layer < n // 8 else base
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


def _iq_low_rule(mix: str, base: str, name: str, shape: tuple[int, ...], model: ModelShape, layer: int,
                 is_output: bool) -> str:
    """llama-quantize's rules for the IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S and IQ2_M mixes: output Q5_K, untied
    token_embd Q2_K (IQ3_S in IQ2_S/M), attn_v Q4_K with GQA >= 4 or >= 4 experts (else Q2_K / IQ3_S), the first
    eighth of ffn_down Q2_K / IQ3_S, attn_output IQ2_XXS in the IQ1 mixes and IQ3_S in IQ2_S/M (Q5_K with 8
    experts), attn_k Q4_K with 8 experts; everything else the base type."""
    more = "iq3_s" if mix in ("iq2_s", "iq2_m") else "q2_k"
    if is_output:
        return "q5_k" if get_format(base).fits(shape[-1]) else "q8_0"
    if name == "token_embd.weight":
        return more
    if name.endswith(("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")):
        return "q4_k" if model.n_gqa >= 4 or model.n_expert >= 4 else more
    if name.endswith("attn_k.weight") and model.n_expert == 8:
        return "q4_k"
    if "ffn_down" in name:
        return more if layer < model.n_layer // 8 else base
    if name.endswith("attn_output.weight"):
        if model.n_expert == 8:
            return "q5_k"
        return "iq2_xxs" if mix in ("iq1_s", "iq1_m") else "iq3_s" if mix in ("iq2_s", "iq2_m") else base
    return base


def _iq3_xxs_rule(base: str, name: str, shape: tuple[int, ...], model: ModelShape, layer: int, is_output: bool,
                  has_imatrix: bool) -> str:
    """llama-quantize's rules for the IQ3_XXS mix: output Q5_K, untied token_embd IQ3_S, attn_v Q4_K with GQA >= 4
    (else IQ3_XXS, IQ3_S without an imatrix; Q8_0 with 8 experts), attn_k (Q8_0 with 8 experts) and attn_q IQ2_S,
    ffn_down Q4_K / Q3_K (first eighth / rest) without an imatrix, attn_output IQ3_S (Q5_K with 8 experts)."""
    if is_output:
        return "q5_k" if get_format(base).fits(shape[-1]) else "q8_0"
    if name == "token_embd.weight":
        return "iq3_s"
    if name.endswith(("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")):
        t = "q4_k" if model.n_gqa >= 4 else "iq3_xxs" if has_imatrix else "iq3_s"
        return "q8_0" if model.n_expert == 8 else t
    if name.endswith("attn_k.weight"):
        return "q8_0" if model.n_expert == 8 else "iq2_s"
    if name.endswith("attn_q.weight"):
        return "iq2_s"
    if "ffn_down" in name and not has_imatrix:
        return "q4_k" if layer < model.n_layer // 8 else "q3_k"
    if name.endswith("attn_output.weight"):
        return "q5_k" if model.n_expert == 8 else "iq3_s"
    return base


def _iq3_rule(mix: str, base: str, name: str, model: ModelShape, layer: int) -> str:
    """llama-quantize's rules for the IQ3_XS, IQ3_S and IQ3_M mixes (base IQ3_S; the output tensor follows the
    K-mix rule, Q6_K): attn_v Q4_K (IQ3_M always, the others with GQA >= 4; Q8_0 with 8 experts), attn_k Q8_0 with
    8 experts or IQ3_XXS in IQ3_XS, attn_q IQ3_XXS in IQ3_XS, IQ3_M's first eighth of ffn_down Q4_K, attn_output
    Q5_K with 8 experts or Q4_K in IQ3_M, and IQ3_XS's ffn_gate / ffn_up IQ3_XXS outside the first and last eighth."""
    n = model.n_layer
    if name == "token_embd.weight":
        return base
    if name.endswith(("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")):
        t = "q4_k" if mix == "iq3_m" or model.n_gqa >= 4 else base
        return "q8_0" if model.n_expert == 8 else t
    if name.endswith("attn_k.weight"):
        return "q8_0" if model.n_expert == 8 else "iq3_xxs" if mix == "iq3_xs" else base
    if name.endswith("attn_q.weight"):
        return "iq3_xxs" if mix == "iq3_xs" else base
    if "ffn_down" in name:
        more = layer < n // 8 or (model.n_expert == 8 and use_more_bits(layer, n))
        return "q4_k" if mix == "iq3_m" and more else base
    if name.endswith("attn_output.weight"):
        if model.n_expert == 8:
            return "q5_k"
        return "q4_k" if mix == "iq3_m" else base
    if ("ffn_gate" in name or "ffn_up" in name) and mix == "iq3_xs" and n // 8 <= layer < 7 * n // 8:
        return "iq3_xxs"
    return base


def imatrix_required(types: dict[str, str], mix: str | None = None) -> list[str]:
    """Tensors of a mix assignment that llama-quantize refuses to make without an imatrix (every tensor typed as
    one of :data:`IMATRIX_TYPES`, or of the mix's :data:`IMATRIX_TYPES_OF_MIX`, except ``token_embd.weight`` and
    ``output.weight``)."""
    need = (*IMATRIX_TYPES, *IMATRIX_TYPES_OF_MIX.get((mix or "").lower(), ()))
    return [n for n, t in types.items() if t in need and n not in ("token_embd.weight", "output.weight")]


def needs_imatrix(fmt: str, tensor: str) -> bool:
    """Whether tensor ``tensor`` (GGUF name) can only take format ``fmt`` with an imatrix: the types llama-quantize
    refuses without one (:data:`IMATRIX_TYPES`; ``token_embd``/``output`` exempt, as there), and for every tensor
    the ones ggml cannot make without one (:data:`CODEC_IMATRIX_TYPES`)."""
    exempt = tensor in ("token_embd.weight", "output.weight")
    return fmt in CODEC_IMATRIX_TYPES or (fmt in IMATRIX_TYPES and not exempt)
