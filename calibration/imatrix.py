"""Importance-matrix accumulation during calibration: the per-column sums of squared matmul inputs that
llama-imatrix collects, turned into a :class:`quantforge.imatrix.Imatrix` (whose file IO lives in the core)."""

from __future__ import annotations

from typing import Any

from ..imatrix import Imatrix, ImatrixEntry


def sum_squares(x: Any) -> Any:
    """Per-column sum of squares of the token rows of ``x`` (``[..., n]`` -> float64 ``[n]``): what
    llama-imatrix adds to ``in_sum2`` for one ``MUL_MAT`` with input ``x``."""
    rows = x.reshape(-1, x.shape[-1]).double()
    return (rows * rows).sum(0)


class ImatrixAccumulator:
    """Running ``in_sum2`` and token counts per weight, fed one matmul input at a time.

    ``names`` maps the key a hook reports (e.g. an HF module name) to the GGUF tensor name stored in the file.
    Inputs with fewer than ``min_rows`` token rows are skipped, as llama-imatrix does (it needs >= 16).
    """

    def __init__(self, names: dict[str, str], min_rows: int = 16) -> None:
        self.names = names
        self.min_rows = min_rows
        self._sums: dict[str, Any] = {}
        self._counts: dict[str, int] = {}
        self._expert_sums: dict[str, Any] = {}  # stacked expert tensor -> float64 [n_mat, n]
        self._expert_counts: dict[str, Any] = {}  # -> float64 [n_mat]

    def add(self, key: str, x: Any) -> None:
        n_rows = x.numel() // x.shape[-1]
        if n_rows < self.min_rows:
            return
        name = self.names[key]
        s = sum_squares(x).cpu()
        self._sums[name] = s if name not in self._sums else self._sums[name] + s
        self._counts[name] = self._counts.get(name, 0) + n_rows

    def add_expert(self, name: str, expert: int, n_mat: int, x: Any) -> None:
        """The rows ``x`` routed to ``expert`` of the stacked tensor ``name``: llama-imatrix's ``MUL_MAT_ID``
        statistics, one slice of sums and one token count per expert (no minimum row count)."""
        import torch

        rows = x.reshape(-1, x.shape[-1])
        if name not in self._expert_sums:
            self._expert_sums[name] = torch.zeros(n_mat, rows.shape[1], dtype=torch.float64)
            self._expert_counts[name] = torch.zeros(n_mat, dtype=torch.float64)
        self._expert_sums[name][expert] += sum_squares(rows).cpu()
        self._expert_counts[name][expert] += rows.shape[0]

    def all_reduce(self, group: Any) -> None:
        """Sum the sums and counts of every rank of ``group`` (a :class:`quantforge.distributed.Group`) into
        this accumulator, so :meth:`result` describes all ranks' inputs; float64 sums, so it equals a one-process
        run to rounding. Every rank must call it; a weight no rank saw stays absent."""
        import torch

        widths: dict[str, int] = {}
        for part in group.all_gather_object({n: int(s.numel()) for n, s in self._sums.items()}):
            widths.update(part)
        names = sorted(widths)
        sums = [self._sums.get(n, torch.zeros(widths[n], dtype=torch.float64)) for n in names]
        counts = torch.tensor([float(self._counts.get(n, 0)) for n in names], dtype=torch.float64)
        *sums, counts = group.all_reduce_sum([*sums, counts])
        self._sums = dict(zip(names, sums, strict=True))
        self._counts = {n: int(c) for n, c in zip(names, counts.tolist(), strict=True)}
        shapes: dict[str, tuple[int, int]] = {}
        for part in group.all_gather_object({n: tuple(s.shape) for n, s in self._expert_sums.items()}):
            shapes.update(part)
        experts = sorted(shapes)
        flat = [self._expert_sums.get(n, torch.zeros(shapes[n], dtype=torch.float64)) for n in experts]
        flat += [self._expert_counts.get(n, torch.zeros(shapes[n][0], dtype=torch.float64)) for n in experts]
        reduced = group.all_reduce_sum(flat) if flat else []
        self._expert_sums = dict(zip(experts, reduced[:len(experts)], strict=True))
        self._expert_counts = dict(zip(experts, reduced[len(experts):], strict=True))

    def result(self, datasets: list[str], chunk_count: int, chunk_size: int) -> Imatrix:
        import numpy as np

        entries = {name: ImatrixEntry(self._sums[name].numpy().astype(np.float32).reshape(1, -1),
                                      np.array([self._counts[name]], dtype=np.float32))
                   for name in sorted(self._sums)}
        for name in sorted(self._expert_sums):
            entries[name] = ImatrixEntry(self._expert_sums[name].numpy().astype(np.float32),
                                         self._expert_counts[name].numpy().astype(np.float32))
        return Imatrix(dict(sorted(entries.items())), list(datasets), int(chunk_count), int(chunk_size))
