"""Calibration split across the ranks of a ``torch.distributed`` job (see :mod:`quantforge.distributed`).

* Importance matrix: each rank runs every ``world``-th batch of calibration chunks through the model, layer by
  layer; the float64 sums of squares and the token counts are summed over ranks with one ``all_reduce``
  (:meth:`.imatrix.ImatrixAccumulator.all_reduce`), so every rank holds the one-process imatrix (to rounding).
* Sensitivity: every rank caches the held-out activations; the Fisher backward is split by held-out chunk
  (labels drawn per chunk, sums reduced with ``all_reduce`` layer by layer); the per-tensor work, the proxies
  of each tensor and the KLD measurement of each (tensor, format) pair, is split by tensor across ranks (:func:`quantforge.distributed.partition` of an estimated cost), and the records are
  gathered before the fit, which every rank then computes identically. Rank 0 writes the files.
"""

from __future__ import annotations

from typing import Any

from ..distributed import Group, partition
from .profile import Profiler
from .refs import TensorRef

_KEY_ORDER = ("proxy_imatrix", "proxy_fisher", "measured_kld")


def proxy_cost(ref: TensorRef, proxy_rows: int) -> float:
    """Work of the proxies of one tensor: sampled rows x columns x candidate formats."""
    rows, cols = ref.shape
    max_rows = proxy_rows * (4 if ref.layer is None else 1)
    used = rows if max_rows <= 0 else min(rows, max_rows)
    return float(used * cols * max(1, len(ref.candidates) - 1))


def measure_cost(ref: TensorRef, n_layers: int) -> float:
    """Work of one KLD measurement: the layers re-run from the tensor's layer, plus the head (and the embedding
    and every layer for the token embedding)."""
    if ref.layer is None:
        return float(n_layers + 1) if ref.kind == "token_embd" else 1.0
    return float(n_layers - ref.layer + 1)


class ShardedProfiler(Profiler):
    """:class:`.profile.Profiler` whose per-tensor proxies and KLD measurements are shared out over ``group``;
    :meth:`fit_and_predict` gathers every rank's records first, so the table equals a one-process run's."""

    def __init__(self, group: Group, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        # tensors that read the same input (q/k/v, gate/up) go to one rank, which batches them as one process does
        inputs: dict[tuple[Any, ...], list[TensorRef]] = {}
        for r in self.refs:
            imat = self._imat(r)
            key = (r.layer, tuple(r.candidates), r.shape[1], None if imat is None else imat.numpy().tobytes())
            inputs.setdefault(key, []).append(r)
        members = list(inputs.values())
        owners = partition([sum(proxy_cost(r, self.s.proxy_rows) for r in m) for m in members], group.world)
        self.proxy_owner = {r.gguf_name: o for m, o in zip(members, owners, strict=True) for r in m}

    def fisher_chunks(self) -> list[int]:
        return [c for c in range(len(self.ids)) if c % self.group.world == self.group.rank]

    def sum_fisher(self, fishers: list[Any]) -> list[Any]:
        return self.group.all_reduce_(fishers)

    def _proxies(self, refs: list[TensorRef], fishers: list[Any]) -> None:
        mine = [(r, f) for r, f in zip(refs, fishers, strict=True) if self.proxy_owner[r.gguf_name] == self.group.rank]
        if mine:
            super()._proxies([r for r, _ in mine], [f for _, f in mine])

    def measure(self, pairs: list[tuple[TensorRef, str]]) -> None:
        owners = partition([measure_cost(ref, self.runner.n_layers) for ref, _ in pairs], self.group.world)
        mine = [p for p, o in zip(pairs, owners, strict=True) if o == self.group.rank]
        for ref, t in mine:
            self.records[ref.gguf_name].setdefault(t, {})
        super().measure(mine)

    def fit_and_predict(self) -> dict[str, Any]:
        self.records = merge_records(self.refs, self.group.all_gather_object(self.records))
        return super().fit_and_predict()


def merge_records(refs: list[TensorRef], parts: list[dict[str, dict[str, dict[str, Any]]]]
                  ) -> dict[str, dict[str, dict[str, Any]]]:
    """One record table from the ranks' partial ones, in the order a one-process run builds it (tensors as in
    ``refs``, formats as in each tensor's candidates, proxies before the measurement)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for ref in refs:
        recs: dict[str, dict[str, Any]] = {}
        seen = {t for p in parts for t in p.get(ref.gguf_name, {})}
        for t in [*(c for c in ref.candidates if c in seen), *sorted(seen - set(ref.candidates))]:
            merged: dict[str, Any] = {}
            for p in parts:
                merged.update(p.get(ref.gguf_name, {}).get(t, {}))
            recs[t] = {k: merged[k] for k in sorted(merged, key=lambda k: (_rank(k), k))}
        out[ref.gguf_name] = recs
    return out


def _rank(key: str) -> int:
    return _KEY_ORDER.index(key) if key in _KEY_ORDER else len(_KEY_ORDER)

