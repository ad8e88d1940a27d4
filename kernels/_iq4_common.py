"""Shared pieces of IQ4_NL and IQ4_XS: the non-linear 4-bit grid, its nearest-value search and ggml's scale search.

Both types store 4-bit indices into :data:`KVALUES_IQ4NL` with one float scale per 32 weights (IQ4_XS quantizes
the eight block scales of a 256 super-block to 6 bits under one fp16 ``d``). llama-quantize runs
``quantize_row_iq4_nl_impl`` with ``ntry = 7`` for both, with or without an imatrix (GGUF.md §2.3):

* weights ``qw * sqrt(sigma2 + x^2)`` with ``sigma2 = 2 * mean(x^2)`` over the super-block, or ``x^2`` without imatrix;
* per 32-block, start from ``d = max / 127`` (``max`` the signed value of largest magnitude), take the
  least-squares scale ``Σwqx / Σwq²`` of the codes, then try the 15 grids ``id = (itry - 127) / max``,
  ``itry = -7..7``, keeping a least-squares scale when it strictly improves ``(Σwqx)² / Σwq²``;
* only the scale is kept; codes are the nearest grid value of ``x / scale`` (ties to the upper index).

Everything is float32 in ggml's operation order with left-to-right sums (:func:`._legacy_common.seqsum_cols`), laid out
position-major ``(32, n_blocks)`` like :mod:`._search`.
"""

from __future__ import annotations

import functools

import torch

from ._legacy_common import fdiv, importance_weights, seqsum_cols, signed_absmax
from ._search import GROUP_MAX_EPS, cdiv, f32

#: The IQ4 grid (``kvalues_iq4nl`` in ggml-common.h): dequantized weight = scale * KVALUES_IQ4NL[index].
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# Nearest-value search by table: every midpoint between neighbouring grid values is a multiple of 1/2, so the
# index of ``a`` depends only on ``floor(2a)``; 512 half-unit cells cover [-128, 128) and the ends saturate.
_CELLS = 512


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index table uint8 and value table float32 ``(512,)`` for cell ``floor(2a) + 256``, and the grid float32."""
    grid = torch.tensor(KVALUES_IQ4NL, dtype=torch.float64)
    mids = (grid[1:] + grid[:-1]) / 2
    lows = (torch.arange(_CELLS, dtype=torch.float64) - _CELLS // 2) / 2
    idx = (lows[:, None] >= mids[None, :]).sum(dim=1)
    f = dict(device=device, dtype=torch.float32)
    return idx.to(device=device, dtype=torch.uint8), grid[idx].to(**f), grid.to(**f)


def _cells(a2: torch.Tensor) -> torch.Tensor:
    """Cell numbers of ``a = a2 / 2`` given ``a2`` (overwritten): ``floor(a2)`` clamped to the table, as int32."""
    return a2.floor_().clamp_(-_CELLS // 2, _CELLS // 2 - 1).add_(_CELLS // 2).to(torch.int32)


def best_index(a: torch.Tensor) -> torch.Tensor:
    """ggml ``best_index_int8(16, kvalues_iq4nl, a)``: index (uint8) of the nearest grid value, exact ties to the
    upper one."""
    return _lookup(_tables(a.device)[0], _cells(a * 2.0))


def _lookup(table: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    return table.index_select(0, cells.reshape(-1)).reshape(cells.shape)


def block_scales(xt: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """The scale search of ``quantize_row_iq4_nl_impl`` (``ntry = 7``) for every 32-block at once.

    ``xt``, ``wt``: float32 ``(32, n_blocks)`` weights and importances. Returns float32 ``(n_blocks,)`` scales;
    0 for blocks whose largest magnitude is below ``GROUP_MAX_EPS``; NaN (``0/0``, as in ggml) for blocks whose
    importances are all zero (an imatrix that is zero over the block's 32 columns).
    """
    values = _tables(xt.device)[1]
    mx = signed_absmax(xt, 0)
    skip = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(skip, torch.ones_like(mx), mx)
    x2 = xt * 2.0
    prods = torch.empty((xt.shape[0], 2, xt.shape[1]), dtype=torch.float32, device=xt.device)

    def sums(inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # 2 * (inv * x) == (2x) * inv exactly, so the cells are those of ggml's ``inv * x``.
        q = _lookup(values, _cells(x2 * inv))
        wq = wt * q
        torch.mul(wq, xt, out=prods[:, 0])
        torch.mul(wq, q, out=prods[:, 1])
        s = seqsum_cols(prods.reshape(prods.shape[0], -1)).reshape(2, -1)
        return s[0], s[1]

    sumqx, sumq2 = sums(cdiv(1.0, fdiv(-mx, f32(KVALUES_IQ4NL[0]))))
    d = sumqx / sumq2
    best = d * sumqx
    for itry in range(-7, 8):
        sumqx, sumq2 = sums(cdiv(float(itry + KVALUES_IQ4NL[0]), mx))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return d.masked_fill_(skip, 0.0)


def importance(x: torch.Tensor, xt: torch.Tensor, qw: torch.Tensor | None, super_block: int) -> torch.Tensor:
    """Per-weight importances ``(32, n_blocks)`` for :func:`block_scales`, ``xt`` the position-major ``x``.

    With an imatrix ``qw`` ``(n,)``: ``qw * sqrt(sigma2 + x^2)``, ``sigma2 = Σx² * 2/super_block`` over each
    super-block; without one ``x^2``.
    """
    if qw is None:
        return xt * xt
    return importance_weights(xt, qw, x.shape[0], super_block, lambda s: s.mul_(2.0 / super_block))


def grid_values(idx: torch.Tensor) -> torch.Tensor:
    """Grid values (float32) at integer indices ``idx`` (any shape)."""
    return _lookup(_tables(idx.device)[2], idx.to(torch.int64))
