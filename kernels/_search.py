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
per-group scalar ``(G,)`` broadcasts without reshaping and a sequential sum is ``n - 1`` contiguous adds.
The ``*_t`` functions take and return that layout; the K-quant codecs call them directly.
"""

from __future__ import annotations

import torch

GROUP_MAX_EPS = 1e-15


def f32(v: float) -> float:
    """``v`` rounded to float32 (as a Python float), for constants that C writes as ``float`` literals."""
    return torch.tensor(v, dtype=torch.float32).item()


def sqrt_f32(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 ``sqrtf``: PyTorch's vectorized CPU sqrt is off by one ulp in ~17% of cases,
    while the float64 square root of a float32, rounded back to float32, is exact."""
    return x.to(torch.float64).sqrt_().to(torch.float32)


def seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sequential float32 sum over dim 0 of ``(n, G)``: ``((0 + t0) + t1) + ...``, like a C accumulation loop."""
    acc = t[0] + 0.0
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def cdiv(num: float, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` for a float32 constant ``num``, as an exact IEEE division.

    ``scalar / tensor`` in PyTorch is ``reciprocal(tensor) * scalar`` (two roundings), and CUDA divides by a
    scalar divisor through its reciprocal, so constants are expanded to full tensors first.
    """
    return torch.full_like(den, num).div_(den)


def qx_search_t(x: torch.Tensor, nmax: int, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`make_qx_quants` on the transposed layout: ``x`` ``(n, G)`` -> ``(scale (G,), L (n, G) int32)``."""
    if w is None:
        w = x * x
    idx = x.abs().argmax(dim=0, keepdim=True)
    mx = x.gather(0, idx).squeeze(0)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    wx = w * x
    best_iscale = scale = best = None
    for c in [float(nmax)] + [f32(nmax + f32(f32(0.1) * k)) for k in range(-9, 10) if k != 0]:
        iscale = cdiv(-c, mx)
        lv = torch.mul(x, iscale).round_().clamp_(-nmax, nmax - 1)
        sumlx = seqsum(wx * lv)
        wl = w * lv
        suml2 = seqsum(wl.mul_(lv))
        if best_iscale is None:
            pos = suml2 != 0
            scale = torch.where(pos, sumlx / torch.where(pos, suml2, torch.ones_like(suml2)), torch.zeros_like(sumlx))
            best = scale * sumlx
            best_iscale = iscale
            continue
        acc = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / suml2
        scale = torch.where(acc, new_scale, scale)
        best = torch.where(acc, new_scale * sumlx, best)
        best_iscale = torch.where(acc, iscale, best_iscale)
    L = torch.mul(x, best_iscale).round_().clamp_(-nmax, nmax - 1).add_(nmax).to(torch.int32)
    L.masked_fill_(zero, 0)
    scale = scale.masked_fill(zero, 0.0)
    return scale, L


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
    Returns ``(scale (G,), the_min (G,), L (n, G) int32)``.
    """
    if w is None:
        w = x * x
    mn = x.amin(dim=0).clamp_(max=0.0)
    mx = x.amax(dim=0)
    flat = (mx == mn) if strict_flat else (mx <= mn)
    sum_w = seqsum(w)
    wx = w * x
    sum_x = seqsum(wx)
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = cdiv(float(nmax), rng)
    scale = cdiv(1.0, iscale)

    def codes(isc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.sub(x, m).mul_(isc).round_().clamp_(0, nmax)

    def error(lv: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        d = torch.mul(lv, s).add_(m).sub_(x)
        d = d.abs_() if use_mad else d.mul_(d)
        return seqsum(d.mul_(w))

    lv = codes(iscale, mn)
    best = error(lv, scale, mn)
    best_iscale, best_base, cur_min = iscale, mn, mn
    for k in range(nstep + 1):
        c = f32(f32(f32(rmin) + f32(f32(rdelta) * k)) + nmax)
        iscale = cdiv(c, mx - cur_min)
        lv = codes(iscale, cur_min)
        wl = w * lv
        sum_l = seqsum(wl)
        sum_l2 = seqsum(wl * lv)
        sum_xl = seqsum(wl.mul_(x))
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        over = this_min > 0
        this_min = this_min.masked_fill_(over, 0.0)
        this_scale = torch.where(over, sum_xl / sum_l2, this_scale)
        cur = error(lv, this_scale, this_min)
        acc = (D > 0) & (cur < best)
        best = torch.where(acc, cur, best)
        scale = torch.where(acc, this_scale, scale)
        best_iscale = torch.where(acc, iscale, best_iscale)
        best_base = torch.where(acc, cur_min, best_base)
        cur_min = torch.where(acc, this_min, cur_min)
    L = codes(best_iscale, best_base).to(torch.int32)
    L.masked_fill_(flat, 0)
    scale = scale.masked_fill(flat, 0.0)
    the_min = torch.where(flat, mn, cur_min).neg_()
    return scale, the_min, L


def qp_search_t(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`make_qp_quants` on the transposed layout: ``x`` ``(n, G)`` (>= 0) -> ``(scale (G,), L (n, G) int32)``."""
    mx = x.amax(dim=0).clamp_(min=0.0)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = cdiv(float(nmax), mx)
    scale = cdiv(1.0, iscale)

    def mse(lv: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        d = torch.mul(lv, s).neg_().add_(x)
        return seqsum(d.mul(w).mul_(d))

    best = mse(torch.mul(x, iscale).round_(), scale)
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = cdiv(f32(f32(f32(0.1) * k) + nmax), mx)
        cur = mse(torch.mul(x, isc).round_().clamp_(max=nmax), cdiv(1.0, isc))
        acc = cur < best
        best = torch.where(acc, cur, best)
        iscale = torch.where(acc, isc, iscale)
    L = torch.mul(x, iscale).round_().clamp_(max=nmax)
    wx = w * x
    sumlx = seqsum(wx * L)
    suml2 = seqsum(w * L * L)
    for _ in range(5):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(x.shape[0]):
            li = L[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = torch.mul(x[i], sl2).div_(slx).round_().clamp_(max=nmax)
            ok &= new != li
            slx = slx + wx[i] * new
            sl2 = sl2 + w[i] * new * new
            ok &= slx * slx * suml2 > sumlx * sumlx * sl2
            L[i] = torch.where(ok, new, li)
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
            changed |= ok
        if not bool(changed.any()):
            break
    pos = suml2 > 0
    scale = torch.where(pos, sumlx / torch.where(pos, suml2, torch.ones_like(suml2)), torch.zeros_like(sumlx))
    L = L.to(torch.int32).masked_fill_(zero, 0)
    return scale.masked_fill_(zero, 0.0), L


def q3_search_t(x: torch.Tensor, nmax: int, do_rmse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`make_q3_quants` on the transposed layout: ``x`` ``(n, G)`` -> ``(scale (G,), L (n, G) int32)``."""
    idx = x.abs().argmax(dim=0, keepdim=True)
    mx = x.gather(0, idx).squeeze(0)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = cdiv(float(-nmax), mx)
    L = torch.mul(x, iscale).round_().clamp_(-nmax, nmax - 1)
    if not do_rmse:
        return cdiv(1.0, iscale).masked_fill_(zero, 0.0), L.add_(nmax).to(torch.int32).masked_fill_(zero, 0)
    w = x * x
    wx = w * x
    sumlx = seqsum(wx * L)
    suml2 = seqsum(w * L * L)
    for _ in range(5):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(x.shape[0]):
            li = L[i]
            slx = sumlx - wx[i] * li
            ok = slx > 0
            sl2 = suml2 - w[i] * li * li
            new = torch.mul(x[i], sl2).div_(slx).round_().clamp_(-nmax, nmax - 1)
            ok &= new != li
            slx = slx + wx[i] * new
            sl2 = sl2 + w[i] * new * new
            ok &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = torch.where(ok, new, li)
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
            changed |= ok
        if not bool(changed.any()):
            break
    scale = (sumlx / suml2).masked_fill_(zero, 0.0)
    return scale, L.add_(nmax).to(torch.int32).masked_fill_(zero, 0)


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
    scale, the_min, L = qkx_search_t(_t(x), None if w is None else _t(w), nmax, rmin, rdelta, nstep, use_mad, strict_flat)
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
