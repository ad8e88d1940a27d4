"""Sensitivity math: KL divergence of perturbed outputs, error proxies, and the fit that turns a proxy into a
predicted KLD. Pure functions of tensors and numbers; the model plumbing lives in :mod:`.profile`.

Two proxies are computed for every (tensor, format) pair from the weight error ``dW = W_q - W``:

* ``imatrix``: ``sum_ij E[x_j^2] dW_ij^2``, the expected squared output error of the linear per token
  (diagonal approximation with llama.cpp's importance matrix); under an optimized rounding mode, which spreads
  errors along the inputs' correlations, the full ``sum_rows dW H dWᵀ`` with the saved ``H = E[x xᵀ]``.
* ``fisher``: ``0.5 / n_tokens * sum_ij F_ij dW_ij^2`` with ``F`` the diagonal Fisher information of the
  model's output distribution w.r.t. the weight, estimated from per-chunk gradients of ``log p(y)`` with labels
  ``y`` sampled from the model itself. This is the second-order expansion of the mean KLD, so it already has KLD
  units and sees everything downstream of the tensor.

Measured pairs fit ``log kld = a_kind + b * log proxy`` (one intercept per tensor kind, one shared slope); the
proxy whose leave-one-out error is lower predicts the pairs that were not measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

LOG_FLOOR = 1e-12


def log_probs(logits: Any) -> Any:
    import torch

    return torch.log_softmax(logits.float(), dim=-1)


def mean_kld(base_logprobs: Any, logits: Any) -> float:
    """Mean over positions of ``KL(p_base || q)``; ``base_logprobs`` and ``logits`` are ``[..., V]``."""
    lq = log_probs(logits)
    lp = base_logprobs.float()
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return float(kl.double().mean())


def imatrix_proxy(dw: Any, imatrix: Any) -> float:
    """``sum_ij imatrix_j * dw_ij^2`` (``imatrix`` = per-column mean of squared inputs; ``None`` = all ones)."""
    e = dw.double().pow(2).sum(0)
    return float(e.sum() if imatrix is None else (e * imatrix.double()).sum())


def hessian_proxy(dw: Any, h: Any) -> float:
    """``sum_rows dw H dwᵀ`` with ``H`` the inputs' full second moments: the expected squared output error per
    token, correlations included (:func:`imatrix_proxy` is its diagonal). Error-feedback rounding lowers exactly
    the off-diagonal part, which the diagonal would not see."""
    d = dw.double()
    return float(((d @ h.to(device=d.device, dtype=d.dtype)) * d).sum())


def fisher_proxy(dw: Any, fisher: Any, n_tokens: int) -> float:
    """Second-order predicted mean KLD ``0.5 / n_tokens * sum_ij fisher_ij * dw_ij^2``."""
    return float(0.5 * (fisher.double() * dw.double().pow(2)).sum() / max(n_tokens, 1))


def row_sample(n_rows: int, max_rows: int) -> Any:
    """Evenly spaced row indices (all rows when ``n_rows <= max_rows``); proxies scale by ``n_rows / len``."""
    import torch

    if max_rows <= 0 or n_rows <= max_rows:
        return torch.arange(n_rows)
    return torch.linspace(0, n_rows - 1, max_rows).round().long().unique()


@dataclass
class Fit:
    """``log kld = intercept[kind] + slope * log proxy`` for one proxy, with its leave-one-out RMSE (log units)
    and the rank correlation of its in-sample predictions with the measurements."""

    proxy: str
    slope: float
    intercepts: dict[str, float]
    default_intercept: float
    loo_rmse: float
    n: int
    spearman: float = float("nan")
    by_kind_n: dict[str, int] = field(default_factory=dict)

    def predict(self, kind: str, proxy_value: float) -> float:
        a = self.intercepts.get(kind, self.default_intercept)
        return math.exp(a + self.slope * math.log(max(proxy_value, LOG_FLOOR)))

    def to_dict(self) -> dict[str, Any]:
        return {"proxy": self.proxy, "slope": round(self.slope, 4),
                "scale_by_kind": {k: float(f"{math.exp(v):.6g}") for k, v in sorted(self.intercepts.items())},
                "default_scale": float(f"{math.exp(self.default_intercept):.6g}"),
                "loo_rmse_log": round(self.loo_rmse, 4), "spearman": round(self.spearman, 4), "n_measured": self.n,
                "n_by_kind": dict(sorted(self.by_kind_n.items()))}


def _fit_once(kinds: Sequence[str], x: Sequence[float], y: Sequence[float], free_slope: bool
              ) -> tuple[float, dict[str, float]]:
    import numpy as np

    names = sorted(set(kinds))
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    slope = 1.0
    if free_slope and len(xs) >= len(names) + 3:
        design = np.zeros((len(xs), len(names) + 1))
        for r, k in enumerate(kinds):
            design[r, names.index(k)] = 1.0
        design[:, -1] = xs
        coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
        slope = float(min(1.5, max(0.5, coef[-1])))
    inter = {k: float(np.median([yy - slope * xx for kk, xx, yy in zip(kinds, xs, ys, strict=True) if kk == k]))
             for k in names}
    return slope, inter


def fit_proxy(proxy: str, kinds: Sequence[str], proxy_values: Sequence[float], measured: Sequence[float],
              free_slope: bool = True) -> Fit | None:
    """Fit ``measured ~ proxy`` in log space (pairs with a zero proxy or measurement are left out)."""
    import numpy as np

    rows = [(k, math.log(p), math.log(m)) for k, p, m in zip(kinds, proxy_values, measured, strict=True)
            if p is not None and m is not None and p > LOG_FLOOR and m > LOG_FLOOR]
    if not rows:
        return None
    ks, xs, ys = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    slope, inter = _fit_once(ks, xs, ys, free_slope)
    default = float(np.median(list(inter.values())))
    errs = []
    for i in range(len(rows)):
        rest = [j for j in range(len(rows)) if j != i]
        if not rest:
            break
        s, it = _fit_once([ks[j] for j in rest], [xs[j] for j in rest], [ys[j] for j in rest], free_slope)
        a = it.get(ks[i], float(np.median(list(it.values()))))
        errs.append((a + s * xs[i] - ys[i]) ** 2)
    loo = math.sqrt(sum(errs) / len(errs)) if errs else float("inf")
    fit = Fit(proxy, slope, inter, default, loo, len(rows),
              by_kind_n={k: ks.count(k) for k in set(ks)})
    fit.spearman = spearman([inter[k] + slope * x for k, x in zip(ks, xs, strict=True)], ys)
    return fit


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (no tie correction)."""
    import numpy as np

    if len(a) < 3:
        return float("nan")
    ra = np.argsort(np.argsort(np.asarray(a)))
    rb = np.argsort(np.argsort(np.asarray(b)))
    return float(np.corrcoef(ra, rb)[0, 1])


def best_fit(fits: Sequence[Fit | None]) -> Fit | None:
    """The fit with the lowest leave-one-out error."""
    ok = [f for f in fits if f is not None]
    return min(ok, key=lambda f: f.loo_rmse) if ok else None


def measurement_sample(layer_kinds: dict[int, list[str]], n_layers: int, n_sample_layers: int) -> set[tuple[int, str]]:
    """(layer, kind) pairs to measure in ``sample`` mode: every kind at ``n_sample_layers`` evenly spaced layers,
    first and last included."""
    if n_layers <= 0:
        return set()
    k = max(1, min(n_sample_layers, n_layers))
    layers = sorted({round(i * (n_layers - 1) / max(k - 1, 1)) for i in range(k)})
    return {(i, kind) for i in layers for kind in layer_kinds.get(i, [])}


def sample_types(candidates: Sequence[str], whole_model: bool = False) -> list[str]:
    """Formats measured for a sampled tensor: the lowest-bit GGUF candidate, the one nearest 4.5 bits per
    weight, and ``nf4`` when offered (``candidates`` is sorted by bits, ``f16`` last). For a tensor outside the
    layers (``whole_model``: embedding, output), also the first at >= 5.5 bits and ``q8_0``."""
    from ..formats import get_format
    from .candidates import TOP

    gguf = [c for c in candidates if c not in (TOP, "nf4")]
    out: list[str] = []
    if gguf:
        bpw = {c: get_format(c).bits_per_weight for c in gguf}
        out += [gguf[0], min(gguf, key=lambda c: (abs(bpw[c] - 4.5), bpw[c]))]
        if whole_model:
            out += [c for c in gguf if bpw[c] >= 5.5][:1] + [c for c in gguf if c == "q8_0"]
    if "nf4" in candidates:
        out.append("nf4")
    return list(dict.fromkeys(out))
