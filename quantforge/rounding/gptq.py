"""Error-feedback (GPTQ-style) rounding inside a GGUF type's block structure.

For a weight ``W`` ``(rows, n)`` whose inputs have second moments ``H = E[x xᵀ]`` ``(n, n)``, the output
error ``‖X Wᵀ - X Ŵᵀ‖²`` is ``Σ_rows (w - ŵ) H (w - ŵ)ᵀ``. Columns are quantized left to right; the rounding error of
each column is spread over the columns not yet quantized through the upper Cholesky factor ``U`` of ``H⁻¹``
(damped), which is the least-squares correction under ``H`` (Frantar et al., GPTQ). With ``e_j = (w_j - ŵ_j) /
U_jj`` the output error the whole row ends with is ``Σ_j e_j²``. Inside that loop the GGUF block structure is
kept:

* when a block begins, its scales and minimums come from the type's own llama.cpp search on the *current*
  (error-corrected) weights, weighted by the importance matrix (or, as an option, by ``1 / U_jj²``: what an
  error in column ``j`` costs once the later columns have compensated for it);
* a few multiples of the block's float16 super-scale ``d`` (:data:`SCALES`) are each run through the block's
  columns (nearest code, error fed forward inside the block) and every row keeps the one whose block adds the
  least ``Σ e_j²``: the scale is chosen for the error left after feedback, not before;
* when the block is complete its ``d`` (and ``dmin``) are re-fitted by weighted least squares to the values the
  codes stand for (kept only where that lowers the weighted error), and the error that flows on to later
  columns is the final one.

The output is an ordinary block of the type (only codes and scale values differ from the default rounding), so
every GGUF reader decodes it. Rows are independent in the math; the bytes are reproducible for the same row
chunks on the same device (a batched matmul may round differently for another number of rows). The lattice
i-quants (IQ1_S ... IQ3_S), whose codes are not per weight, are rounded by :mod:`.lattice` (feedback per
256-weight super-block) through the same :class:`GptqRounder`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from ..errors import InputError
from ..formats import QuantFormat
from ..kernels.feedback import feedback_block
from .grids import CodeGrid, affine, get_f16, grid_for, set_f16, with_codes
from .lattice import covers as lattice_covers
from .lattice import lattice_rows

DAMP = 0.01
"""Damping added to ``H``'s diagonal, as a fraction of its mean (GPTQ's default; 0.03 raised the KL divergence
of dithered SmolLM2's q4_k_m)."""
SCALES = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2)
"""Multiples of the searched super-scale ``d`` tried per block under error feedback. On dithered SmolLM2's q4_k_m
(imatrix weighting, damping 0.01) they took the KL divergence from 16% to 20% below llama.cpp's; ``1 / U_jj²``
weighting with damping 0.03 lowered each layer's held-out output error further but raised the KL divergence."""
BATCH = 256
"""Columns whose error updates are applied to the rest of the row at once (lazy batch); a multiple of every
block size."""


def inverse_factor(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor ``U`` (float32) of ``(H + λI)⁻¹``, ``λ = damp · mean diag H``; columns no input ever
    reached (zero diagonal) get a unit diagonal. Computed in float64; the damping grows tenfold until ``H`` is
    positive definite."""
    H = h.to(torch.float64, copy=True)
    diag = torch.diagonal(H)
    dead = diag <= 0
    diag[dead] = 1.0
    base = float(diag.mean()) if diag.numel() else 1.0
    for k in range(6):  # at most three (n, n) float64 matrices alive at once: H, the damped copy, its factor
        damped = H.clone()
        damped.diagonal().add_((damp * 10 ** k) * base)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            break
    else:
        raise InputError("the input second-moment matrix is not positive semi-definite; recalibrate")
    del H, diag
    hinv = torch.cholesky_inverse(L)
    del L
    return torch.linalg.cholesky(hinv, upper=True).to(torch.float32)


def _weighted_fit(basis: list[torch.Tensor], target: torch.Tensor,
                  qw: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per row, the ``qw``-weighted least-squares coefficients of ``target`` on one or two ``basis`` tensors
    (float64 normal equations), and where the fit is determined."""
    t, w = target.to(torch.float64), qw.to(torch.float64)
    A = [a.to(torch.float64) for a in basis]
    if len(A) == 1:
        aa = (w * A[0] * A[0]).sum(dim=1)
        ok = aa > 0
        return [(w * A[0] * t).sum(dim=1) / torch.where(ok, aa, 1.0)], ok
    a00, a11, a01 = (w * A[0] * A[0]).sum(1), (w * A[1] * A[1]).sum(1), (w * A[0] * A[1]).sum(1)
    r0, r1 = (w * A[0] * t).sum(1), (w * A[1] * t).sum(1)
    det = a00 * a11 - a01 * a01
    ok = det.abs() > 1e-12 * (a00 * a11).abs()
    safe = torch.where(ok, det, 1.0)
    return [(r0 * a11 - r1 * a01) / safe, (r1 * a00 - r0 * a01) / safe], ok


def _fields(grid: CodeGrid) -> list[int]:
    return [grid.d_at] + ([grid.dmin_at] if grid.dmin_at is not None else [])


def refit_super_scales(grid: CodeGrid, blocks: torch.Tensor, target: torch.Tensor, qw: torch.Tensor,
                       codes: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks whose float16 ``d`` (and ``dmin``) are the ``qw``-weighted least-squares fit of their decoded values
    to ``target`` ``(R, block)`` with codes and sub-block scales fixed; a row keeps its old values unless the new
    ones (after float16 rounding) lower the weighted error. ``codes`` (stored codes) spare the 32-weight types a
    decode."""
    R = blocks.shape[0]
    parts = _fields(grid)
    if grid.flat:
        values = grid.values_tensor(blocks.device)
        if codes is None:
            s, o = affine(grid, blocks)
            t = (grid.fmt.dequantize(blocks) - o) / torch.where(s != 0, s, 1.0)
            codes = (t[..., None] - values).abs().argmin(dim=-1)
        v = values[codes]
        basis = [v] + ([torch.ones_like(v)] if len(parts) == 2 else [])

        def decode(b: torch.Tensor) -> torch.Tensor:
            d, m = affine(grid, b)
            return d * v + m
    else:
        one, zero = torch.ones(R, device=blocks.device), torch.zeros(R, device=blocks.device)
        basis = []
        for at in parts:
            b = blocks
            for other in parts:
                b = set_f16(b, other, one if other == at else zero)
            basis.append(grid.fmt.dequantize(b))
        decode = grid.fmt.dequantize
    coef, ok = _weighted_fit(basis, target, qw)
    new = blocks
    for i, at in enumerate(parts):
        new = set_f16(new, at, torch.where(ok, coef[i].to(torch.float32), get_f16(blocks, at)))
    y_new = decode(new)
    err_old = ((decode(blocks) - target) ** 2 * qw).sum(dim=1)
    err_new = ((y_new - target) ** 2 * qw).sum(dim=1)
    better = torch.isfinite(y_new).all(dim=1) & ok & (err_new < err_old)
    return torch.where(better[:, None], new, blocks)


def _decode(grid: CodeGrid, blocks: torch.Tensor, codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if grid.flat:
        d, m = affine(grid, blocks)
        return d * values[codes] + m
    return grid.fmt.dequantize(blocks)


def gptq_rows(weight: torch.Tensor, fmt: QuantFormat, factor: torch.Tensor, imatrix: torch.Tensor | None,
              refit: bool = True, scales: tuple[float, ...] = SCALES, weighting: str = "imatrix") -> torch.Tensor:
    """Rows ``(R, n)`` float -> packed ``(R, n / block * type_size)`` uint8 of ``fmt``, rounded with error feedback
    through ``factor`` (:func:`inverse_factor` of the inputs' ``H``).

    ``scales``: the multiples of each block's super-scale tried (``(1.0,)``: the searched one only).
    ``weighting``: what weights the block searches and the refit, ``"hessian"`` (``1 / U_jj²``) or ``"imatrix"``
    (``imatrix`` ``(n,)``, llama.cpp's per-column mean of squared inputs; unused otherwise). Each lazy batch of
    columns is held transposed (one contiguous row per column); a block's candidates run side by side as extra
    rows, through :func:`~quantforge.kernels.feedback.feedback_block` (one Triton launch per block on CUDA)."""
    if weighting not in ("hessian", "imatrix") or (weighting == "imatrix" and imatrix is None):
        raise InputError(f"weighting must be 'hessian' or 'imatrix' (with an imatrix), got {weighting!r}")
    grid = grid_for(fmt.name)
    W = weight.to(torch.float32).clone()
    R, n = W.shape
    bs, ts = fmt.block_size, fmt.type_size
    if n % bs:
        raise InputError(f"{fmt.name} needs rows that are a multiple of {bs}, got {n}")
    U = factor.to(W.device)
    udiag = torch.diagonal(U)
    qw = imatrix.to(device=W.device, dtype=torch.float32) if weighting == "imatrix" else 1.0 / udiag ** 2
    values = grid.values_tensor(W.device)
    out = torch.empty((R, n // bs * ts), dtype=torch.uint8, device=W.device)
    M = len(scales)
    mult = torch.tensor(scales, dtype=torch.float32, device=W.device).repeat_interleave(R)
    step = max(BATCH, bs)
    for b0 in range(0, n, step):
        b1 = min(n, b0 + step)
        Wt = W[:, b0:b1].t().contiguous()  # (columns, R)
        err = torch.empty_like(Wt)
        for c0 in range(b0, b1, bs):
            c1 = c0 + bs
            wq = qw[c0:c1]
            blocks = fmt.quantize(Wt[c0 - b0:c1 - b0].t().contiguous(), wq if fmt.takes_imatrix else None)
            cand = blocks if M == 1 else set_f16(blocks.repeat(M, 1), grid.d_at,
                                                 get_f16(blocks, grid.d_at).repeat(M) * mult)
            s, o = (t.t().contiguous() for t in affine(grid, cand))
            Wb = Wt[c0 - b0:c1 - b0].repeat(1, M)  # (bs, M R)
            codes, eb = feedback_block(Wb, s, o, U[c0:c1, c0:c1], values, grid.uniform)
            if M > 1:
                cost = (eb * eb).sum(0).view(M, R)
                best = cost.argmin(0)
                pick = best * R + torch.arange(R, device=W.device)
                codes, eb, Wb = codes[:, pick], eb[:, pick], Wb[:, pick]
                blocks = cand[pick]
            else:
                blocks = cand
            blocks = with_codes(grid, blocks, codes.t())
            if refit:
                target = Wb.t()
                fitted = refit_super_scales(grid, blocks, target, wq, codes.t())
                if not torch.equal(fitted, blocks):
                    eb = (target - _decode(grid, fitted, codes.t(), values)).t() / udiag[c0:c1, None]
                    blocks = fitted
            err[c0 - b0:c1 - b0] = eb
            Wt[c0 - b0:c1 - b0] = Wb
            if c1 < b1:
                Wt[c1 - b0:].addmm_(U[c0:c1, c1:b1].t(), eb, alpha=-1.0)
            out[:, c0 // bs * ts:c1 // bs * ts] = blocks
        if b1 < n:
            W[:, b1:].addmm_(err.t(), U[b0:b1, b1:], alpha=-1.0)
    return out


class FactorCache:
    """The factors of the last few input groups (q/k/v share one), computed once each and dropped least recently
    used first, so memory stays at a few ``(n, n)`` matrices however many weights there are."""

    def __init__(self, size: int = 3) -> None:
        self.size = size
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.diagonals: dict[str, torch.Tensor] = {}  # diag H per group (n floats each), kept for every group
        self._lock = threading.Lock()

    def get(self, key: str, load: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key].to(device)
            factor = inverse_factor(load().to(device))
            self._items[key] = factor
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return factor


class GptqRounder:
    """``quantize(rows, imatrix)`` for one weight with error feedback from its inputs' ``H`` (loaded by ``load``
    when first needed; its factor is shared through ``cache`` under ``group``) for every row chunk and thread.
    ``weighting`` is :func:`gptq_rows`'s; under ``"imatrix"`` a missing imatrix is ``diag H``. Lattice i-quants
    go through :func:`.lattice.lattice_rows` (its searches weighted by the imatrix, or by ``1 / U_jj²`` under
    ``"hessian"``)."""

    def __init__(self, fmt: QuantFormat, load: Callable[[], torch.Tensor], group: str,
                 cache: FactorCache | None = None, refit: bool = True, weighting: str = "imatrix") -> None:
        if not lattice_covers(fmt.name):
            grid_for(fmt.name)
        self.fmt, self.load, self.group, self.refit, self.weighting = fmt, load, group, refit, weighting
        self.cache = cache or FactorCache()

    def __call__(self, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        n = weight.shape[1]
        hessian: list[torch.Tensor] = []

        def load() -> torch.Tensor:
            hessian.append(self.load())
            h = hessian[0]
            if h.dim() != 2 or h.shape[0] != h.shape[1] or h.shape[0] != n:
                raise InputError(f"input second moments of shape {tuple(h.shape)} do not fit a weight with {n} "
                                 "columns")
            self.cache.diagonals[self.group] = torch.diagonal(h).clamp(min=0).cpu()
            return h

        factor = self.cache.get(self.group, load, weight.device)
        if factor.shape[0] != n:
            raise InputError(f"input second moments are {factor.shape[0]} wide, the weight has {n} columns")
        if self.weighting == "imatrix" and imatrix is None:
            if self.group not in self.cache.diagonals:
                self.cache.diagonals[self.group] = torch.diagonal(self.load()).clamp(min=0).cpu()
            imatrix = self.cache.diagonals[self.group]
        if lattice_covers(self.fmt.name):
            if self.weighting not in ("hessian", "imatrix"):
                raise InputError(f"weighting must be 'hessian' or 'imatrix', got {self.weighting!r}")
            qw = imatrix if self.weighting == "imatrix" else 1.0 / torch.diagonal(factor) ** 2
            return lattice_rows(weight, self.fmt, factor, qw.to(weight.device), refit=self.refit)
        return gptq_rows(weight, self.fmt, factor, None if imatrix is None else imatrix.to(weight.device),
                         refit=self.refit, weighting=self.weighting)
