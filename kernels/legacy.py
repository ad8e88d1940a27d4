"""The legacy GGUF types Q4_0, Q4_1, Q5_0, Q5_1: blocks of 32 weights, one fp16 scale ``d`` each.

| type | block layout (bytes) | value |
| --- | --- | --- |
| Q4_0 | ``d: f16, qs[16]`` (18, 4.5 bpw) | ``d * (q - 8)``, q in 0..15 |
| Q4_1 | ``d: f16, m: f16, qs[16]`` (20, 5.0 bpw) | ``d * q + m``, q in 0..15 |
| Q5_0 | ``d: f16, qh[4], qs[16]`` (22, 5.5 bpw) | ``d * (q - 16)``, q in 0..31 |
| Q5_1 | ``d: f16, m: f16, qh[4], qs[16]`` (24, 6.0 bpw) | ``d * q + m``, q in 0..31 |

``qs`` holds element ``j`` in the low nibble of byte ``j`` and element ``j + 16`` in its high nibble; ``qh`` is bit 4
of every code (little-endian u32, bit ``j`` = element ``j``).

``quantize`` follows llama.cpp. Without an imatrix it is ``quantize_row_q{4,5}_{0,1}_ref``: the symmetric types take
``d = max / -2^(bits-1)`` (``max`` the signed value of largest magnitude) and
``q = min(top, int8(x * (1/d) + half + 0.5))``; the types with a min take ``d = (max - min) / top``, ``m = min``,
``q = int8((x - min) * (1/d) + 0.5)`` (clamped to ``top`` except in Q5_1). With one it is
``quantize_row_q{4,5}_{0,1}_impl``: weights ``qw * sqrt(sigma2 + x^2)`` (``sigma2`` the row's mean of ``x^2``),
``make_qx_quants(32, 2^(bits-1))`` for the symmetric types and ``make_qkx3_quants(32, top, -0.9, 0.05, 36)`` for
the others. The machinery is in :mod:`._legacy_common`; the Triton
dequantize goes through the registry tiles (:mod:`.tiles`).
"""

from __future__ import annotations

from ._legacy_common import LegacyCodec, LegacySpec

Q4_0 = LegacyCodec("q4_0", LegacySpec(bits=4, has_min=False, clamp_ref=True))
Q4_1 = LegacyCodec("q4_1", LegacySpec(bits=4, has_min=True, clamp_ref=True))
Q5_0 = LegacyCodec("q5_0", LegacySpec(bits=5, has_min=False, clamp_ref=True))
Q5_1 = LegacyCodec("q5_1", LegacySpec(bits=5, has_min=True, clamp_ref=False))
