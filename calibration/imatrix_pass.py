"""Stage 1 of calibration: the importance matrix, layer by layer (llama-imatrix semantics)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..imatrix import Imatrix
from .hooks import capture_inputs, linear_modules
from .imatrix import ImatrixAccumulator
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
            with runner.on_device(i), capture_inputs(mods, acc.add), expert_inputs(runner.layers[i], i, acc):
                for b, h in enumerate(hs):
                    h = h.to(runner.device)
                    hs[b] = runner.layer(i, h, ctxs(h)).to(keep)
    if group.distributed:
        acc.all_reduce(group)
    return acc.result(datasets, n_chunks, ctx_len)


@contextlib.contextmanager
def expert_inputs(layer: Any, i: int, acc: ImatrixAccumulator) -> Iterator[None]:
    """Route the per-expert inputs of layer ``i``'s stacked experts (if any) into ``acc`` inside the block."""
    from .moe import layer_experts

    experts = layer_experts(layer)
    if experts is None:
        yield
        return
    n_mat = experts.n_experts
    experts.sink = lambda kind, e, x: acc.add_expert(f"blk.{i}.ffn_{kind}_exps.weight", e, n_mat, x)
    try:
        yield
    finally:
        experts.sink = None
