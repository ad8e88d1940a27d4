"""Scale searches shared by the GGUF quantizers, vectorized over batches of independent groups.

Each public function mirrors one of ggml's per-group searches (``make_qx_quants``, ``make_qkx2_quants``,
``make_qkx3_quants``, ``make_qp_quants``, ``make_q3_quants``; GGUF.md §2.1) and returns the same decisions
for a whole batch at once:

- inputs ``x`` (and weights ``w``) are float32 ``(G, n)``: ``G`` independent groups of ``n`` values;
- the candidate loops run in Python over at most 37 candidates, each fully vectorized over ``G``;
- a candidate replaces the running best only where it is *strictly* better, so the earlier one wins ties;
- all arithmetic is float32 in ggml's operation order, with ``torch.round`` (half to even) as ``nearest_int``,
  and every sum over a group is a sequential left-to-right float32 sum, as in the C loops.

Internally the groups are laid out transposed, ``(n, G)``: row ``i`` holds element ``i`` of every group, so a
per-group scalar ``(G,)`` broadcasts without reshaping and a sequential sum runs down contiguous rows (:func:`seqsum`).
The ``*_t`` functions take and return that layout; the K-quant codecs call them directly.
"""

from __future__ import annotations

import functools

import torch

GROUP_MAX_EPS = 1e-15


def f32(v: float) -> float:
    """``v`` rounded to float32 (as a Python float), for constants that C writes as ``float`` literals."""
    return torch.tensor(v, dtype=torch.float32).item()


def sqrt_f32(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 ``sqrtf``: PyTorch's vectorized CPU sqrt is off by one ulp in ~17% of cases,
    while the float64 square root of a float32, rounded back to float32, is exact."""
    return x.to(torch.float64).sqrt_().to(torch.float32)


_SEQ_ROWS = 17
_SEQ_COLS = 32


def _loop_sum(t: torch.Tensor) -> torch.Tensor:
    acc = t[0] + 0.0
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def _cpu_sum(t: torch.Tensor, scratch: bool) -> torch.Tensor:
    """Sequential sum of ``(n, G)`` (``G % 32 == 0``) with ``torch.sum`` over windows of at most 17 rows.

    Longer sums carry the partial result into the last row of the window (``t`` is overwritten, or a copy).
    """
    n = t.shape[0]
    if n <= _SEQ_ROWS:
        return torch.sum(t, dim=0)
    if not scratch:
        t = t.clone()
    start = 0
    while n - start > _SEQ_ROWS:
        acc = torch.sum(t[start : start + _SEQ_ROWS - 1], dim=0)
        start += _SEQ_ROWS - 2
        t[start].copy_(acc)
    return torch.sum(t[start:], dim=0)


@functools.lru_cache(maxsize=1)
def _cpu_sum_is_sequential() -> bool:
    """True when this PyTorch build's CPU ``sum(dim=0)`` adds up to 17 rows strictly in order, column by column.

    Its vectorized outer reduction does (one accumulator per column until a cascade level of 16 rows is full) for
    column counts that are multiples of 32; checked once here on heavy-tailed data, where any other order shows.
    """
    g = torch.Generator().manual_seed(0)
    for n, cols in ((2, 32), (16, 64), (17, 8192), (32, 96), (40, 160), (256, 1024)):
        t = torch.randn(n, cols, generator=g) * torch.exp(3 * torch.randn(n, cols, generator=g))
        ref = _loop_sum(t)
        if not (torch.equal(_cpu_sum(t, False), ref) and torch.equal(_cpu_sum(t.clone(), True), ref)):
            return False
    return True


def seqsum(t: torch.Tensor, scratch: bool = False) -> torch.Tensor:
    """Sequential float32 sum over dim 0 of ``(n, G)``: ``((0 + t0) + t1) + ...``, like a C accumulation loop.

    On CPU this is a few ``torch.sum`` calls over row windows where that is verified to be sequential, instead of
    ``n - 1`` row adds; ``scratch=True`` lets it overwrite ``t`` (a temporary) to save a copy.
    """
    if t.device.type != "cpu" or not _cpu_sum_is_sequential():
        return _loop_sum(t)
    G = t.shape[1]
    pad = -G % _SEQ_COLS
    if pad:
        return _cpu_sum(torch.nn.functional.pad(t, (0, pad)), True)[:G]
    return _cpu_sum(t.contiguous(), scratch or not t.is_contiguous())


def cdiv(num: float, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` for a float32 constant ``num``, as an exact IEEE division.

    ``scalar / tensor`` in PyTorch is ``reciprocal(tensor) * scalar`` (two roundings), and CUDA divides by a
    scalar divisor through its reciprocal, so constants are expanded to full tensors first.
    """
    return torch.full_like(den, num).div_(den)


def max_abs_signed(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Along ``dim`` of a 2-D ``x``, the value of largest magnitude with its sign (the first one if ``a``, ``-a`` tie).

    Built from ``amax``/``amin`` (``argmax`` over a strided dim is ~70x slower on CPU); only groups holding both
    ``a`` and ``-a`` as extremes need the position, and those are resolved separately.
    """
    hi = x.amax(dim=dim)
    lo = x.amin(dim=dim)
    v = torch.where(hi >= -lo, hi, lo)
    tie = ((hi == -lo) & (hi != 0)).nonzero().squeeze(1)
    if tie.numel():
        sub = x.index_select(1 - dim, tie)
        idx = sub.abs().argmax(dim=dim, keepdim=True)
        v[tie] = sub.gather(dim, idx).squeeze(dim)
    return v


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den != 0``, else 0 (C's ``den ? num/den : 0``)."""
    nz = den != 0
    return torch.where(nz, num / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(num))


def qx_search_t(x: torch.Tensor, nmax: int, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`make_qx_quants` on the transposed layout: ``x`` ``(n, G)`` -> ``(scale (G,), L (n, G) int32)``."""
    if w is None:
        w = x * x
    mx = max_abs_signed(x)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    wx = w * x
    lv = torch.empty_like(x)
    tmp = torch.empty_like(x)
    best_iscale = scale = best = None
    for c in [float(nmax)] + [f32(nmax + f32(f32(0.1) * k)) for k in range(-9, 10) if k != 0]:
        iscale = cdiv(-c, mx)
        torch.mul(x, iscale, out=lv).round_().clamp_(-nmax, nmax - 1)
        sumlx = seqsum(torch.mul(wx, lv, out=tmp), scratch=True)
        suml2 = seqsum(torch.mul(w, lv, out=tmp).mul_(lv), scratch=True)
        if best_iscale is None:
            scale = _safe_ratio(sumlx, suml2)
            best = scale * sumlx
            best_iscale = iscale
            continue
        acc = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / suml2
        scale = torch.where(acc, new_scale, scale)
        best = torch.where(acc, new_scale * sumlx, best)
        best_iscale = torch.where(acc, iscale, best_iscale)
    L = torch.mul(x, best_iscale, out=lv).round_().clamp_(-nmax, nmax - 1).add_(nmax).to(torch.int32)
    return scale.masked_fill_(zero, 0.0), L.masked_fill_(zero, 0)


def qkx_search_t(
    x: torch.Tensor,
    w: torch.Tensor | None,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    strict_flat: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`make_qkx2_quants` / :func:`make_qkx3_quants` on the transposed layout ``(n, G)``.

    ``strict_flat`` selects the degenerate-group test: qkx2 gives up when ``max == min``, qkx3 when ``max <= min``.
    Returns ``(scale (G,), the_min (G,), L (n, G) int32)``. The codes of the best candidate are recomputed at the
    end from its ``(iscale, min)`` instead of being copied on every accept.
    """
    if w is None:
        w = x * x
    mn = x.amin(dim=0).clamp_(max=0.0)
    mx = x.amax(dim=0)
    flat = (mx == mn) if strict_flat else (mx <= mn)
    sum_w = seqsum(w)
    wx = w * x
    sum_x = seqsum(wx, scratch=True)
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = cdiv(float(nmax), rng)
    scale = cdiv(1.0, iscale)
    lv, a, b, c = (torch.empty_like(x) for _ in range(4))

    def codes(isc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.sub(x, m, out=lv).mul_(isc).round_().clamp_(0, nmax)

    def error(s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        d = torch.mul(lv, s, out=b).add_(m).sub_(x)
        d = d.abs_() if use_mad else d.mul_(d)
        return seqsum(d.mul_(w), scratch=True)

    codes(iscale, mn)
    best = error(scale, mn)
    best_iscale, best_base, cur_min = iscale, mn, mn
    for k in range(nstep + 1):
        iscale = cdiv(f32(f32(f32(rmin) + f32(f32(rdelta) * k)) + nmax), mx - cur_min)
        codes(iscale, cur_min)
        torch.mul(w, lv, out=a)
        torch.mul(a, lv, out=b)
        torch.mul(a, x, out=c)
        sum_l = seqsum(a, scratch=True)
        sum_l2 = seqsum(b, scratch=True)
        sum_xl = seqsum(c, scratch=True)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        over = this_min > 0
        this_min.masked_fill_(over, 0.0)
        this_scale = torch.where(over, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min)
        acc = (D > 0) & (cur < best)
        best = torch.where(acc, cur, best)
        scale = torch.where(acc, this_scale, scale)
        best_iscale = torch.where(acc, iscale, best_iscale)
        best_base = torch.where(acc, cur_min, best_base)
        cur_min = torch.where(acc, this_min, cur_min)
    L = codes(best_iscale, best_base).to(torch.int32).masked_fill_(flat, 0)
    the_min = torch.where(flat, mn, cur_min).neg_()
    return scale.masked_fill_(flat, 0.0), the_min, L


def _step(
    x: torch.Tensor,
    w: torch.Tensor,
    wx: torch.Tensor,
    li: torch.Tensor,
    sumlx: torch.Tensor,
    suml2: torch.Tensor,
    lo: int | None,
    hi: int,
    qp: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One coordinate-descent move of ``make_qp_quants`` (``qp``) / ``make_q3_quants`` at a position.

    The current code ``li`` would move to ``nearest(x * Σ'wl² / Σ'wxl)`` (sums without this position); returns
    ``(accept, new code, new Σwxl, new Σwl²)``. Rows ``(G,)`` give one position; ``(n, G)`` blocks evaluate every
    position against the same group sums at once (what a sequential pass sees up to its first accepted move).
    """
    slx = torch.mul(wx, li).neg_().add_(sumlx)
    sl2 = torch.mul(w, li).mul_(li).neg_().add_(suml2)
    ok = slx > 0
    if qp:
        ok &= sl2 > 0
    new = torch.mul(x, sl2).div_(slx).round_().clamp_(lo, hi)
    ok &= new != li
    slx.add_(torch.mul(wx, new))
    sl2.add_(torch.mul(w, new).mul_(new))
    if not qp:
        ok &= sl2 > 0
    ok &= torch.mul(slx, slx).mul_(suml2) > torch.mul(sumlx, sumlx) * sl2
    return ok, new, slx, sl2


def _descent(
    x: torch.Tensor,
    w: torch.Tensor,
    L: torch.Tensor,
    lo: int | None,
    hi: int,
    qp: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to 5 passes of the coordinate descent of ``make_qp_quants`` (``qp``) / ``make_q3_quants`` on codes ``L``.

    Position by position, a code moves when that raises ``(Σ w x l)² / Σ w l²`` (:func:`_step`). Until its first
    move a group's sums stay fixed, so one block evaluation of all positions finds the groups that move at all in
    a pass; only those run the sequential pass, and a group that did not move is done (the C loop's early exit).
    ``L`` (float, ``(n, G)``) is updated in place; returns the final ``(Σ w x l, Σ w l²)``.
    """
    wx = w * x
    sumlx = seqsum(wx * L, scratch=True)
    suml2 = seqsum(w * L * L, scratch=True)
    active = torch.arange(x.shape[1], device=x.device)
    for _ in range(5):
        if active.numel() < x.shape[1]:
            xs, ws, wxs, Ls = (t.index_select(1, active) for t in (x, w, wx, L))
            sx, s2 = sumlx.index_select(0, active), suml2.index_select(0, active)
        else:
            xs, ws, wxs, Ls, sx, s2 = x, w, wx, L, sumlx, suml2
        moves = _step(xs, ws, wxs, Ls, sx, s2, lo, hi, qp)[0]
        moving = moves.view(torch.uint8).amax(dim=0).nonzero().squeeze(1)
        if moving.numel() == 0:
            break
        active = active[moving]
        xs, ws, wxs, Ls = (t.index_select(1, moving) for t in (xs, ws, wxs, Ls))
        sx, s2 = sx[moving], s2[moving]
        for i in range(x.shape[0]):
            ok, new, slx, sl2 = _step(xs[i], ws[i], wxs[i], Ls[i], sx, s2, lo, hi, qp)
            Ls[i] = torch.where(ok, new, Ls[i])
            sx = torch.where(ok, slx, sx)
            s2 = torch.where(ok, sl2, s2)
        L.index_copy_(1, active, Ls)
        sumlx.index_copy_(0, active, sx)
        suml2.index_copy_(0, active, s2)
    return sumlx, suml2


@functools.lru_cache(maxsize=None)
def qp_steps(nmax: int) -> tuple[float, ...]:
    """``make_qp_quants``' grid stretches ``0.1 k + nmax``, ``k = ±1 ... ±4`` in its order (float32 values)."""
    return tuple(f32(f32(f32(0.1) * k) + nmax) for k in (-4, -3, -2, -1, 1, 2, 3, 4))


def qp_search_t(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`make_qp_quants` on the transposed layout: ``x`` ``(n, G)`` (>= 0) -> ``(scale (G,), L (n, G) int32)``."""
    mx = x.amax(dim=0).clamp_(min=0.0)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = cdiv(float(nmax), mx)
    scale = cdiv(1.0, iscale)

    def mse(lv: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        d = torch.mul(lv, s).neg_().add_(x)
        return seqsum(d.mul(w).mul_(d), scratch=True)

    best = mse(torch.mul(x, iscale).round_(), scale)
    for step in qp_steps(nmax):
        isc = cdiv(step, mx)
        cur = mse(torch.mul(x, isc).round_().clamp_(max=nmax), cdiv(1.0, isc))
        acc = cur < best
        best = torch.where(acc, cur, best)
        iscale = torch.where(acc, isc, iscale)
    L = torch.mul(x, iscale).round_().clamp_(max=nmax)
    sumlx, suml2 = _descent(x, w, L, None, nmax, qp=True)
    scale = torch.where(suml2 > 0, _safe_ratio(sumlx, suml2), torch.zeros_like(sumlx))
    return scale.masked_fill_(zero, 0.0), L.to(torch.int32).masked_fill_(zero, 0)


def q3_search_t(x: torch.Tensor, nmax: int, do_rmse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`make_q3_quants` on the transposed layout: ``x`` ``(n, G)`` -> ``(scale (G,), L (n, G) int32)``."""
    mx = max_abs_signed(x)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = cdiv(float(-nmax), mx)
    L = torch.mul(x, iscale).round_().clamp_(-nmax, nmax - 1)
    if not do_rmse:
        scale = cdiv(1.0, iscale)
    else:
        sumlx, suml2 = _descent(x, x * x, L, -nmax, nmax - 1, qp=False)
        scale = sumlx / suml2
    return scale.masked_fill_(zero, 0.0), L.add_(nmax).to(torch.int32).masked_fill_(zero, 0)


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).t().contiguous()


def make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric signed search (ggml ``make_qx_quants``, ``rmse_type=1``).

    Codes ``l`` in ``[-nmax, nmax-1]`` with the group's largest-magnitude value mapped to ``-nmax``; tries 19 scales
    around that and keeps the one maximizing ``(Σ w x l)² / Σ w l²`` (= least weighted squared error under the
    optimal scale). ``w`` defaults to ``x²``. Returns ``scale (G,)`` and ``L = l + nmax`` ``(G, n)`` in
    ``[0, 2*nmax-1]``; dequantize as ``scale * (L - nmax)``. Used by Q3_K/Q6_K and the legacy imatrix paths.
    """
    scale, L = qx_search_t(_t(x), nmax, None if w is None else _t(w))
    return scale, L.t().contiguous()


def make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric search ``x ≈ scale * L + min`` with ``L`` in ``[0, nmax]`` (ggml ``make_qkx2_quants``).

    Starts from the min/max grid, then tries ``nstep + 1`` grid stretches ``(nmax + rmin + rdelta*k)`` and refits
    ``(scale, min)`` by weighted least squares for each; keeps the one with the least weighted error (absolute if
    ``use_mad`` else squared). As in ggml, each stretch is measured from the last *accepted* min. The min is never
    positive; ``the_min = -min >= 0`` is returned. Used by the Q2_K/Q4_K/Q5_K ref (no imatrix) paths.
    """
    return _qkx_public(x, w, nmax, rmin, rdelta, nstep, use_mad, strict_flat=True)


def make_qkx3_quants(
    x: torch.Tensor, w: torch.Tensor | None, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`make_qkx2_quants` as ggml's ``make_qkx3_quants``: ``w=None`` means ``x²``, flat test ``max <= min``.

    Used by the imatrix paths of Q2_K/Q4_K/Q5_K and Q4_1/Q5_1.
    """
    return _qkx_public(x, w, nmax, rmin, rdelta, nstep, use_mad, strict_flat=False)


def _qkx_public(x, w, nmax, rmin, rdelta, nstep, use_mad, strict_flat):
    wt = None if w is None else _t(w)
    scale, the_min, L = qkx_search_t(_t(x), wt, nmax, rmin, rdelta, nstep, use_mad, strict_flat)
    return scale, the_min, L.t().contiguous()


def make_qp_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize non-negative values (sub-block scales or mins) to ``[0, nmax]`` (ggml ``make_qp_quants``).

    Tries 9 grid scales around ``nmax / max`` by weighted squared error, then up to 5 passes of coordinate descent
    on the codes; returns the least-squares super-block scale ``Σ w x L / Σ w L²`` and ``L`` ``(G, n)``. Used by
    the imatrix paths of Q2_K/Q4_K/Q5_K for ``d``/``dmin``.
    """
    scale, L = qp_search_t(_t(x), nmax, _t(w))
    return scale, L.t().contiguous()


def make_q3_quants(x: torch.Tensor, nmax: int, do_rmse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric signed search with coordinate descent (ggml ``make_q3_quants``, weights ``x²``).

    Starts from ``l = nearest(-nmax/max * x)`` and, with ``do_rmse``, runs up to 5 passes moving single codes
    when that improves ``(Σ w x l)² / Σ w l²``. Returns ``scale (G,)`` and ``L = l + nmax`` ``(G, n)``. Used by
    the Q3_K ref (no imatrix) path.
    """
    scale, L = q3_search_t(_t(x), nmax, do_rmse)
    return scale, L.t().contiguous()
