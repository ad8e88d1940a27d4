"""Error-feedback (GPTQ-style) rounding for the lattice i-quants (IQ1_S ... IQ3_S), whose codes are indices into
a lattice of 4- or 8-weight points with shared signs and scales, so no single weight can be rounded on its own.

Error feedback runs at the super-block granularity instead: the row's 256-column super-blocks are quantized left
to right, each by the type's own search (joint scales and lattice points, weighted by the importance matrix as
the default rounding is) on the *current*, error-corrected weights, and its whole error ``E`` is spread over the
columns not yet quantized by the least-squares update for a set of columns quantized at once. With ``U`` the
upper Cholesky factor of the damped ``H⁻¹`` (:func:`.gptq.inverse_factor`), the columns ``S`` of the super-block
and ``T`` those after it, the inverse of ``H`` restricted to ``S ∪ T`` is ``U_FFᵀ U_FF`` (``F = S ∪ T``), so the
update ``-E (H⁻¹_SS)⁻¹ H⁻¹_ST`` is ``-E U_SS⁻¹ U_ST``, and the output error the super-block leaves once the later
columns have compensated is ``‖E U_SS⁻¹‖²`` per row.

That cost also sets the block's float16 super-scale ``d``: every lattice type decodes to ``d`` times a value fixed
by the codes, so the ``d`` minimizing ``‖(w - d v) U_SS⁻¹‖²`` has a closed form, kept where (after float16
rounding) it lowers the cost. The output is an ordinary block of the type, decoded by every GGUF reader.
"""

from __future__ import annotations

import torch

from ..errors import InputError, UnsupportedFormat
from ..formats import QuantFormat
from .grids import get_f16, set_f16

TYPES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s")
"""The lattice i-quants this module rounds; ``d`` is the float16 at byte 0 of each block except in IQ1_M."""
SUPER = 256


def covers(name: str) -> bool:
    """Whether type ``name`` is a lattice i-quant this module rounds."""
    return name in TYPES


def _iq1_m_sc(blocks: torch.Tensor) -> torch.Tensor:
    """IQ1_M's four little-endian u16 scale words (bytes 48..55) as int32 ``(R, 4)``."""
    sc = blocks[:, 48:56].to(torch.int32).reshape(-1, 4, 2)
    return sc[:, :, 0] | (sc[:, :, 1] << 8)


def get_d(name: str, blocks: torch.Tensor) -> torch.Tensor:
    """The super-scale ``d`` of every block ``(R, type_size)`` uint8, float32 ``(R,)``; IQ1_M keeps its float16
    bits in the top nibbles of its four scale words (lowest nibble first)."""
    if name != "iq1_m":
        return get_f16(blocks, 0)
    sc = _iq1_m_sc(blocks)
    bits = sum(((sc[:, i] >> 12) & 15) << (4 * i) for i in range(4))
    return bits.to(torch.int16).view(torch.float16).to(torch.float32)


def set_d(name: str, blocks: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """A copy of ``blocks`` with super-scale ``d`` ``(R,)`` (rounded to float16)."""
    if name != "iq1_m":
        return set_f16(blocks, 0, d)
    bits = d.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    sc = _iq1_m_sc(blocks)
    sc = (sc & 0x0FFF) | (((bits[:, None] >> (4 * torch.arange(4, device=blocks.device))) & 15) << 12)
    out = blocks.clone()
    out[:, 48:56] = torch.stack([sc & 255, sc >> 8], dim=2).reshape(-1, 8).to(torch.uint8)
    return out


def refit_d(fmt: QuantFormat, blocks: torch.Tensor, target: torch.Tensor, uinv: torch.Tensor) -> torch.Tensor:
    """Blocks whose ``d`` minimizes ``‖(target - ŵ) uinv‖²`` per row with the codes fixed (``uinv`` = ``U_SS⁻¹``,
    ``(256, 256)``); a row keeps its ``d`` unless the fitted one, rounded to float16, lowers that cost."""
    R = blocks.shape[0]
    v = fmt.dequantize(set_d(fmt.name, blocks, torch.ones(R, device=blocks.device)))
    av, aw = v @ uinv, target @ uinv
    vv = (av * av).sum(dim=1)
    ok = vv > 0
    new = set_d(fmt.name, blocks, torch.where(ok, (av * aw).sum(dim=1) / torch.where(ok, vv, 1.0),
                                              get_d(fmt.name, blocks)))
    y_new = fmt.dequantize(new)
    cost_old = (((target - fmt.dequantize(blocks)) @ uinv) ** 2).sum(dim=1)
    cost_new = (((target - y_new) @ uinv) ** 2).sum(dim=1)
    better = ok & torch.isfinite(y_new).all(dim=1) & (cost_new < cost_old)
    return torch.where(better[:, None], new, blocks)


def lattice_rows(weight: torch.Tensor, fmt: QuantFormat, factor: torch.Tensor, imatrix: torch.Tensor,
                 refit: bool = True) -> torch.Tensor:
    """Rows ``(R, n)`` float -> packed ``(R, n / 256 * type_size)`` uint8 of lattice type ``fmt``, each super-block
    searched by the type's quantizer under ``imatrix`` ``(n,)`` and its error fed forward through ``factor``
    (:func:`.gptq.inverse_factor` of the inputs' ``H``); ``refit``: re-fit each ``d`` to the feedback cost. Rows
    are independent; float32 throughout."""
    if not covers(fmt.name):
        raise UnsupportedFormat(f"lattice rounding supports {', '.join(TYPES)}; not {fmt.name}")
    W = weight.to(torch.float32).clone()
    R, n = W.shape
    if n % SUPER:
        raise InputError(f"{fmt.name} needs rows that are a multiple of {SUPER}, got {n}")
    U = factor.to(device=W.device, dtype=torch.float32)
    if tuple(U.shape) != (n, n):
        raise InputError(f"input second moments are {U.shape[0]} wide, the weight has {n} columns")
    qw = imatrix.to(device=W.device, dtype=torch.float32)
    ts = fmt.type_size
    out = torch.empty((R, n // SUPER * ts), dtype=torch.uint8, device=W.device)
    eye = torch.eye(SUPER, dtype=torch.float32, device=W.device)
    for c0 in range(0, n, SUPER):
        c1 = c0 + SUPER
        ws = W[:, c0:c1].contiguous()
        uinv = torch.linalg.solve_triangular(U[c0:c1, c0:c1], eye, upper=True)
        blocks = fmt.quantize(ws, qw[c0:c1])
        if refit:
            blocks = refit_d(fmt, blocks, ws, uinv)
        out[:, c0 // SUPER * ts:c1 // SUPER * ts] = blocks
        if c1 < n:
            g = (ws - fmt.dequantize(blocks)) @ uinv
            W[:, c1:].addmm_(g, U[c0:c1, c1:], alpha=-1.0)
    return out
