"""Stage 1 of calibration: the importance matrix, layer by layer (llama-imatrix semantics)."""

from __future__ import annotations

from typing import Any

from .hooks import capture_inputs, linear_modules
from .imatrix import Imatrix, ImatrixAccumulator
from .refs import Contexts, TensorRef, batches
from .runner import DecoderRunner
from .settings import Progress, no_progress


def collect_imatrix(runner: DecoderRunner, refs: list[TensorRef], chunks: list[list[int]], ctx_len: int,
                    datasets: list[str], batch_size: int = 4, progress: Progress = no_progress,
                    group: Any = None) -> Imatrix:
    """Stage 1: llama-imatrix's sums of squared matmul inputs per column, for every layer weight.

    ``group`` (a distributed :class:`quantforge.distributed.Group`): this rank runs its share of the batches
    and the sums are reduced over ranks (see :mod:`.parallel`)."""
    import torch

    from ..distributed import SINGLE, shard_batches

    group = group or SINGLE
    n_chunks, chunks = len(chunks), shard_batches(chunks, batch_size, group)

    names = {id(r.module): r.gguf_name for r in refs if r.layer is not None}
    keyed = {r.gguf_name: r.module for r in refs if r.layer is not None}
    acc = ImatrixAccumulator({g: g for g in keyed})
    keep = runner.device if runner.resident else torch.device("cpu")
    ctxs = Contexts(runner)
    with torch.no_grad():
        hs = [runner.embed(b).to(keep) for b in batches(chunks, batch_size)]
        for i in progress(range(runner.n_layers), total=runner.n_layers, desc="imatrix", unit="layer"):
            mods = {names[id(m)]: m for m in linear_modules(runner.layers[i]).values() if id(m) in names}
            with runner.on_device(i), capture_inputs(mods, acc.add):
                for b, h in enumerate(hs):
                    h = h.to(runner.device)
                    hs[b] = runner.layer(i, h, ctxs(h)).to(keep)
    if group.distributed:
        acc.all_reduce(group)
    return acc.result(datasets, n_chunks, ctx_len)
