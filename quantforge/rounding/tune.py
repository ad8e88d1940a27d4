"""Tuned rounding inside a GGUF type's block structure.

For a weight ``W`` ``(rows, n)`` whose inputs have second moments ``H = E[x xᵀ]``, the layer's output error on the
calibration tokens is ``Σ_rows Δ H Δᵀ`` with ``Δ = W - Ŵ``: ``H`` is all the tuned mode needs, so it reads the
same ``hessians.safetensors`` as ``gptq`` and the loss is exact over every calibration token, not a sample.

Starting from the type's own blocks (``gptq``'s codes in the exporter, or the default rounding), it learns

* a code per weight and
* a multiplier of each block's float16 scale ``d`` and, where the type has one, of its minimum ``dmin`` (the
  super-block scales of the k-quants, the block scale and minimum of the 32-weight types), in ``[0.5, 1.5]``,

in two phases:

1. (``iters`` steps, off by default) AutoRound's sign-gradient descent on a rounding offset ``V`` in
   ``[-0.5, 0.5]`` per weight (code ``round(p + V)``, ``p`` the weight's grid position under the current scales
   pulled into its starting code's rounding cell, so ``V = 0`` is the start) and on the multipliers, through
   the straight-through estimator, with a linearly decaying step and the best parameters per row kept;
2. (``sweeps`` passes) exact descent on the same loss: column by column, each weight's code moves one step up
   or down where that lowers the loss (its change is ``2 δ G_j + δ² H_jj`` for a value step ``δ``, with
   ``G = Δ H`` kept current), then each block's multipliers move to the minimum of the loss along them (it is
   quadratic in each).

The codes and scales are then written into the start blocks (codes through the type's packer, scales as
float16; the sub-block integer scales stay the start's), and each row keeps whichever of the start and the tuned
blocks has the lower output error when decoded exactly: the result is never worse than its start. The mode draws
no random numbers; the bytes are reproducible for the same row chunks on the same device.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from ..errors import InputError, UnsupportedFormat
from ..formats import QuantFormat
from ..kernels.code_sweep import sweep_codes
from .grids import CodeGrid, affine, get_f16, grid_for, set_f16, with_codes

ITERS = 0
"""Sign-gradient steps per row chunk. Off by default: on random 512-wide layers with correlated inputs, 50-200
steps (AutoRound's count) from ``gptq``'s codes lowered the output error by at most 1% (0 in most types), and
from the default rounding reached 0.87-0.97 of its error where ``gptq`` reaches 0.63-0.76; the exact passes
below lower ``gptq``'s error by a further 25-35%."""
SWEEPS = 4
"""Exact code-and-scale refinement passes after the gradient steps (each lowers the error; 2 reach about two
thirds of what 4 do)."""
SCALE_RANGE = (0.5, 1.5)
"""Bounds of the learned scale and minimum multipliers."""
DAMP_PER_DIM = 4.0
"""The loss's ``H`` gets ``λ · diag(H)`` added, ``λ = DAMP_PER_DIM · n / tokens``: a matrix estimated from few
tokens per input dimension is noisy, and fitting its small directions exactly raised the error on held-out text
(dithered SmolLM2, 8192 calibration tokens, held-out Dolly text: ffn_down at ``λ = 0`` 0.4-12% above gptq's
held-out error, 3-9% below it over attn_q / ffn_gate / ffn_down at ``λ`` 0.3-0.8)."""
DAMP_UNKNOWN = 0.3
"""``λ`` when the token count is not known."""


def covers(name: str) -> bool:
    """Whether the tuned mode learns codes for type ``name``: the types whose codes are consecutive integers (the
    k-quants, ``q8_0`` and the legacy types); ``iq4_nl`` / ``iq4_xs`` (non-uniform codes) are not covered."""
    try:
        return grid_for(name).uniform
    except UnsupportedFormat:
        return False


def damped(h: torch.Tensor, tokens: int | None) -> torch.Tensor:
    """``H + λ diag(H)`` (:data:`DAMP_PER_DIM`) for a matrix estimated from ``tokens`` inputs."""
    lam = DAMP_PER_DIM * h.shape[0] / tokens if tokens else DAMP_UNKNOWN
    return h + lam * torch.diag(torch.diagonal(h))


def row_errors(weight: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per row ``Δ H Δᵀ`` (float32 ``(R,)``), the output error over the calibration tokens up to their count."""
    delta = weight - approx
    return ((delta @ h) * delta).sum(dim=1)


class _Params:
    """The learned tensors, with per-row copies of the best values seen."""

    def __init__(self, R: int, n: int, nb: int, with_min: bool, device: torch.device) -> None:
        self.v = torch.zeros((R, n), device=device)
        self.a = torch.ones((R, nb), device=device)
        self.b = torch.ones((R, nb), device=device) if with_min else None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.v, self.a, self.b) if t is not None]

    def copy_rows(self, other: _Params, rows: torch.Tensor) -> None:
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            mine[rows] = theirs[rows]


def _codes_and_values(grid: CodeGrid, p: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Code indices (int64) and their values with the straight-through gradient to ``p + v``."""
    lo, hi = grid.values[0], grid.values[-1]
    t = (p + v).clamp(lo, hi)
    q = t.detach().round()
    return (q - lo).to(torch.int64), t + (q - t).detach()


def tune_rows(weight: torch.Tensor, fmt: QuantFormat, h: torch.Tensor, start: torch.Tensor,
              iters: int = ITERS, lr: float | None = None, sweeps: int = SWEEPS) -> torch.Tensor:
    """Rows ``(R, n)`` float -> packed ``(R, n / block * type_size)`` uint8 of ``fmt``, tuned from ``start`` (the
    rows' packed blocks under some rounding) to lower ``Σ_rows Δ H Δᵀ``. ``lr`` is the sign-gradient step
    (default ``1 / iters``, as AutoRound)."""
    grid = grid_for(fmt.name)
    if not grid.uniform:
        raise InputError(f"the tuned mode does not cover {fmt.name} (its codes are not consecutive integers)")
    W = weight.to(torch.float32)
    R, n = W.shape
    bs, ts = fmt.block_size, fmt.type_size
    nb = n // bs
    H = h.to(device=W.device, dtype=torch.float32)
    blocks0 = start.reshape(R * nb, ts)
    s0, o0 = (t.reshape(R, nb, bs) for t in affine(grid, blocks0))
    deq0 = fmt.dequantize(blocks0).reshape(R, n)
    live = s0 != 0
    lo = grid.values[0]
    z0 = torch.where(live, ((deq0.reshape(R, nb, bs) - o0) / torch.where(live, s0, 1.0)).round(), lo)
    Wb = W.reshape(R, nb, bs)
    with_min = grid.dmin_at is not None
    cur, best = _Params(R, n, nb, with_min, W.device), _Params(R, n, nb, with_min, W.device)
    best_err = row_errors(W, deq0, H)
    step = 1.0 / max(iters, 1) if lr is None else lr
    cell = 0.5 - 1e-3

    def forward(params: _Params) -> tuple[torch.Tensor, torch.Tensor]:
        s = s0 * params.a[:, :, None]
        o = o0 * params.b[:, :, None] if params.b is not None else o0
        p = torch.where(live, (Wb - o) / torch.where(live, s, 1.0), z0)
        p = torch.minimum(torch.maximum(p, z0 - cell), z0 + cell).detach()
        codes, vals = _codes_and_values(grid, p, params.v.reshape(R, nb, bs))
        approx = torch.where(live, s * vals + o, deq0.reshape(R, nb, bs))
        return codes, approx.reshape(R, n)

    for it in range(iters):
        for t in cur.tensors():
            t.requires_grad_(True)
        _, approx = forward(cur)
        delta = (W - approx).detach()
        g = delta @ H
        err = (g * delta).sum(dim=1)
        improved = err < best_err
        if bool(improved.any()):
            best_err = torch.where(improved, err, best_err)
            best.copy_rows(cur, improved)
        approx.backward(-2.0 * g)
        rate = step * (1.0 - it / iters)
        with torch.no_grad():
            grads = [t.grad for t in cur.tensors()]
            for t, gr in zip(cur.tensors(), grads, strict=True):
                t.requires_grad_(False)
                t.sub_(rate * torch.sign(gr))
            cur.v.clamp_(-0.5, 0.5)
            cur.a.clamp_(*SCALE_RANGE)
            if cur.b is not None:
                cur.b.clamp_(*SCALE_RANGE)
        for t in cur.tensors():
            t.grad = None
    with torch.no_grad():
        _, approx = forward(cur)
        err = row_errors(W, approx, H)
        improved = err < best_err
        best.copy_rows(cur, improved)
        codes, _ = forward(best)
        codes = codes.reshape(R, n)
        for _ in range(sweeps):
            _sweep_codes(grid, W, H, s0.reshape(R, n) * best.a.repeat_interleave(bs, dim=1),
                         _offsets(o0, best).reshape(R, n), live.reshape(R, n), codes, deq0)
            _step_scales(grid, W, H, s0, o0, live, codes.reshape(R, nb, bs), best, deq0)
    return _encode(grid, fmt, W, H, blocks0, codes.reshape(R * nb, bs), best, deq0)


def _offsets(o0: torch.Tensor, params: _Params) -> torch.Tensor:
    return o0 * params.b[:, :, None] if params.b is not None else o0


def _gradient(grid: CodeGrid, W: torch.Tensor, H: torch.Tensor, s: torch.Tensor, o: torch.Tensor,
              live: torch.Tensor, codes: torch.Tensor, deq0: torch.Tensor) -> torch.Tensor:
    """``G = (Ŵ - W) H`` for per-weight scales ``s``, offsets ``o`` and code indices ``codes`` (all ``(R, n)``)."""
    approx = torch.where(live, s * (codes.to(torch.float32) + grid.values[0]) + o, deq0)
    return (approx - W) @ H


def _sweep_codes(grid: CodeGrid, W: torch.Tensor, H: torch.Tensor, s: torch.Tensor, o: torch.Tensor,
                 live: torch.Tensor, codes: torch.Tensor, deq0: torch.Tensor, batch: int = 128) -> None:
    """One pass over the columns, moving each weight's code one step up or down wherever that lowers
    ``Σ_rows Δ H Δᵀ`` exactly (:func:`~quantforge.kernels.code_sweep.sweep_codes`: one Triton launch per batch of
    columns on CUDA); ``codes`` is updated in place. The gradient of the columns of a batch is kept current inside
    it, the rest once per batch."""
    R, n = W.shape
    top = len(grid.values) - 1
    G = _gradient(grid, W, H, s, o, live, codes, deq0)
    s, live, H = s.contiguous(), live.contiguous(), H.contiguous()
    for b0 in range(0, n, batch):
        b1 = min(n, b0 + batch)
        D = sweep_codes(G, s, live, codes, H, b0, b1, top)
        if b0 > 0:
            G[:, :b0].addmm_(D, H[b0:b1, :b0])
        if b1 < n:
            G[:, b1:].addmm_(D, H[b0:b1, b1:])


def _step_scales(grid: CodeGrid, W: torch.Tensor, H: torch.Tensor, s0: torch.Tensor, o0: torch.Tensor,
                 live: torch.Tensor, codes: torch.Tensor, params: _Params, deq0: torch.Tensor) -> None:
    """Each block's scale (and minimum) multiplier moved, block after block, to the exact minimum of the output
    error along it (the loss is quadratic in each), within :data:`SCALE_RANGE`; ``params`` updated in place."""
    R, nb, bs = s0.shape
    n = nb * bs
    vals = codes.to(torch.float32) + grid.values[0]
    s = s0 * params.a[:, :, None]
    G = _gradient(grid, W, H, s.reshape(R, n), _offsets(o0, params).reshape(R, n), live.reshape(R, n),
                  codes.reshape(R, n), deq0)
    dirs = [(params.a, torch.where(live, s0 * vals, 0.0))]
    if params.b is not None:
        dirs.append((params.b, torch.where(live, o0, 0.0)))
    for blk in range(nb):
        cols = slice(blk * bs, (blk + 1) * bs)
        hb = H[cols, cols]
        for mult, u_all in dirs:
            u = u_all[:, blk]
            den = ((u @ hb) * u).sum(dim=1)
            num = (G[:, cols] * u).sum(dim=1)
            target = (mult[:, blk] - num / torch.where(den > 0, den, 1.0)).clamp(*SCALE_RANGE)
            t = torch.where(den > 0, target - mult[:, blk], 0.0)
            mult[:, blk] += t
            G.addmm_(t[:, None] * u, H[cols, :])


def _encode(grid: CodeGrid, fmt: QuantFormat, W: torch.Tensor, H: torch.Tensor, blocks0: torch.Tensor,
            codes: torch.Tensor, params: _Params, deq0: torch.Tensor) -> torch.Tensor:
    """The tuned codes and scale multipliers written into the start blocks; per row, the better of start and tuned
    under the exact decode."""
    R, n = W.shape
    blocks = with_codes(grid, blocks0, codes)
    blocks = set_f16(blocks, grid.d_at, get_f16(blocks0, grid.d_at) * params.a.reshape(-1))
    if params.b is not None:
        blocks = set_f16(blocks, grid.dmin_at, get_f16(blocks0, grid.dmin_at) * params.b.reshape(-1))
    approx = fmt.dequantize(blocks).reshape(R, n)
    keep = torch.isfinite(approx).all(dim=1) & (row_errors(W, approx, H) < row_errors(W, deq0, H))
    out = torch.where(keep[:, None], blocks.reshape(R, -1), blocks0.reshape(R, -1))
    return out.contiguous()


class SecondMoments:
    """The last few input groups' ``H`` on their device, loaded once each (q/k/v share one) and dropped least
    recently used first, so memory stays at a few ``(n, n)`` matrices."""

    def __init__(self, size: int = 3) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, load: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
        with self._lock:
            k = (key, str(device))
            if k not in self._items:
                self._items[k] = load().to(device=device, dtype=torch.float32)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            self._items.move_to_end(k)
            return self._items[k]


class TuneRounder:
    """``quantize(rows, imatrix)`` for one weight: the start rounding (``start(rows, imatrix)``, e.g. a
    :class:`~quantforge.rounding.gptq.GptqRounder`, or the type's own quantizer) tuned against its inputs' ``H``
    (loaded by ``load``, shared through ``cache`` under ``group``; estimated from ``tokens`` inputs, which sets
    the damping, :func:`damped`)."""

    def __init__(self, fmt: QuantFormat, load: Callable[[], torch.Tensor], group: str,
                 start: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
                 cache: SecondMoments | None = None, iters: int = ITERS, sweeps: int = SWEEPS,
                 tokens: int | None = None) -> None:
        if not covers(fmt.name):
            raise InputError(f"the tuned mode does not cover {fmt.name}")
        self.fmt, self.load, self.group, self.iters, self.sweeps = fmt, load, group, iters, sweeps
        self.start, self.tokens = start, tokens
        self.cache = cache or SecondMoments()

    def __call__(self, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        n = weight.shape[1]
        h = self.cache.get(self.group, self.load, weight.device)
        if h.dim() != 2 or h.shape[0] != h.shape[1] or h.shape[0] != n:
            raise InputError(f"input second moments of shape {tuple(h.shape)} do not fit a weight with {n} columns")
        if imatrix is None:
            imatrix = torch.diagonal(h).clamp(min=0)
        imatrix = imatrix.to(weight.device)
        if self.start is not None:
            start = self.start(weight, imatrix)
        else:
            start = self.fmt.quantize(weight, imatrix if self.fmt.takes_imatrix else None)
        return tune_rows(weight, self.fmt, damped(h, self.tokens), start.to(weight.device), iters=self.iters,
                         sweeps=self.sweeps)
