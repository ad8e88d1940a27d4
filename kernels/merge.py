"""LoRA merge: ``W' = dequant(W) + scale * B @ A`` per target module, in float32, one tile at a time.

``W`` is a :class:`~quantforge.kernels.qweight.QuantWeight` in any registry format: ``bf16``/``f16``/``f32`` for
a merge onto the original 16-bit weight, or NF4 / a GGUF block type for a merge onto the quantized base an
adapter was trained against. The Triton kernel reads each ``(BR, BC)`` tile of ``W`` through the format's
shared tile dequantizer (:mod:`quantforge.kernels.tiles`), so no float copy of the base exists; it adds the
delta of that tile and stores the merged tile in float32 (for a quantizer) or bf16.

The delta is summed as ``r`` rank-1 updates in order ``k = 0..r-1`` (``acc += B[:, k] * A[k, :]``), then
``W + scale * acc``, every step rounded to float32 on its own. Compiled without fp fusion, the kernel equals
:func:`merge_reference` bit for bit in float32; the bf16 store rounds once (to nearest even on a GPU).

Shapes: ``A (r, in)`` float32, ``B (out, r)`` float32, ``W (out, in)``.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ._triton import HAVE_TRITON, check_launchable, tl, triton
from .qweight import QuantWeight

#: Rows x columns of one merge program.
MERGE_TILE = (32, 128)

if HAVE_TRITON:

    @triton.jit
    def merge_kernel(src, aux, a_ptr, b_ptr, dst, n_rows, n_cols, stride, rank, scale, TILE: tl.constexpr,
                     BR: tl.constexpr, BC: tl.constexpr):
        """One ``(BR, BC)`` tile: dequantize the base through ``TILE``, add ``scale * sum_k B[:, k] A[k, :]``."""
        row = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)[:, None]
        col = (tl.program_id(1) * BC + tl.arange(0, BC)).to(tl.int64)[None, :]
        row_ok = row < n_rows
        col_ok = col < n_cols
        mask = row_ok & col_ok
        w = TILE(src, aux, row, col, stride, mask)
        acc = tl.zeros((BR, BC), dtype=tl.float32)
        for k in range(rank):
            bk = tl.load(b_ptr + row * rank + k, mask=row_ok, other=0.0)
            ak = tl.load(a_ptr + k * n_cols + col, mask=col_ok, other=0.0)
            acc += bk * ak
        y = w + scale * acc
        tl.store(dst + row * n_cols + col, y.to(dst.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def _check(base: QuantWeight, a: torch.Tensor, b: torch.Tensor) -> None:
    out, n = base.shape
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[1] != n or b.shape[0] != out:
        raise InputError(f"LoRA factors of shapes {list(a.shape)} and {list(b.shape)} do not fit a base weight "
                         f"of shape {[out, n]}; expected A (r, {n}) and B ({out}, r)")


def lora_delta_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B @ A`` in float32 as ``r`` ordered rank-1 updates (the kernel's summation order)."""
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    acc = torch.zeros((b.shape[0], a.shape[1]), dtype=torch.float32, device=a.device)
    for k in range(a.shape[0]):
        acc += b32[:, k:k + 1] * a32[k:k + 1, :]
    return acc


def merge_reference(base: QuantWeight, a: torch.Tensor, b: torch.Tensor, scale: float,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PyTorch reference merge: ``(dequant(base) + scale * B @ A).to(dtype)``, ``(out, in)``."""
    _check(base, a, b)
    w = base.dequantize(torch.float32)
    s = torch.tensor(scale, dtype=torch.float32, device=w.device)
    return (w + s * lora_delta_reference(a.to(w.device), b.to(w.device))).to(dtype)


def merge_triton(base: QuantWeight, a: torch.Tensor, b: torch.Tensor, scale: float,
                 dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton merge (CUDA, or CPU under ``TRITON_INTERPRET=1``): same values as :func:`merge_reference`."""
    from .tiles import default_aux, load_tile

    _check(base, a, b)
    check_launchable(base.device.type)
    rows, n = base.shape
    data = base.data.contiguous()
    a32 = a.to(device=data.device, dtype=torch.float32).contiguous()
    b32 = b.to(device=data.device, dtype=torch.float32).contiguous()
    if out is None:
        out = torch.empty((rows, n), dtype=dtype, device=data.device)
    aux = base.extra.get("aux")
    if aux is None:
        aux = default_aux(base.format, data.device)
    if rows and n:
        br, bc = MERGE_TILE
        grid = (triton.cdiv(rows, br), triton.cdiv(n, bc))
        merge_kernel[grid](data, data if aux is None else aux, a32, b32, out, rows, n, data.shape[1],
                           a32.shape[0], float(scale), TILE=load_tile(base.format, base.double_quant), BR=br, BC=bc,
                           enable_fp_fusion=False)
    return out


def merge_blas(base: QuantWeight, a: torch.Tensor, b: torch.Tensor, scale: float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The CPU merge: one float32 ``addmm`` (BLAS summation order, so equal to :func:`merge_reference` to
    float32 rounding, not bit for bit), several times faster than ``r`` rank-1 passes."""
    _check(base, a, b)
    w = base.dequantize(torch.float32)
    return torch.addmm(w, b.to(w.device, torch.float32), a.to(w.device, torch.float32), alpha=float(scale)).to(dtype)


def merge_weight(base: QuantWeight, a: torch.Tensor, b: torch.Tensor, scale: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The merged ``(out, in)`` weight in ``dtype``: the Triton kernel for CUDA weights, else :func:`merge_blas`
    (on CPU the interpreter would only slow the merge down)."""
    from ._triton import triton_available

    if base.device.type == "cuda" and triton_available():
        return merge_triton(base, a, b, scale, dtype)
    return merge_blas(base, a, b, scale, dtype)


def merge_quantize(base: QuantWeight, a: torch.Tensor, b: torch.Tensor, scale: float, fmt: str,
                   imatrix: torch.Tensor | None = None) -> QuantWeight:
    """Merge, then hand the float32 result straight to the quantizer of ``fmt`` (no 16-bit round trip)."""
    return QuantWeight.quantize(merge_weight(base, a, b, scale, torch.float32), fmt, imatrix)
