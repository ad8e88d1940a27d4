"""Padding-free packing: examples concatenated into batches of at most ``batch_tokens`` tokens.

A batch is one flat token sequence: ``input_ids`` / ``labels`` / ``position_ids`` ``(T,)`` with positions
restarting at 0 per example, plus the example lengths (attention never crosses them). The order of examples is a
seeded shuffle per epoch, filled greedily in that order, so the schedule of batches is a pure function of the
seed: a resumed run rebuilds it and continues at its step.

Under several ranks the schedule stays the global one (the same optimizer steps, examples and token counts for
any number of ranks); :func:`rank_batches` splits each step's examples among the ranks, token-balanced and the
same on every rank, and each rank packs its share into micro-batches of at most ``batch_tokens``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..distributed import partition
from ..errors import InputError
from .attention import PackInfo
from .data import Example


@dataclass
class Batch:
    """One packed micro-batch on the CPU; :meth:`to` moves it to the model's device."""

    input_ids: torch.Tensor      # (T,) int64
    labels: torch.Tensor         # (T,) int64, -100 where no loss
    position_ids: torch.Tensor   # (T,) int64, restarting per example
    lengths: list[int]

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_targets(self) -> int:
        return int((self.labels != -100).sum())

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PackInfo]:
        nb = device.type == "cuda"
        return (self.input_ids.to(device, non_blocking=nb), self.labels.to(device, non_blocking=nb),
                self.position_ids.to(device, non_blocking=nb), PackInfo.from_lengths(self.lengths, device))


def make_batch(examples: list[Example]) -> Batch:
    ids, labels, pos = [], [], []
    for ex in examples:
        ids.extend(ex.ids)
        labels.extend(ex.labels())
        pos.extend(range(len(ex)))
    return Batch(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                 torch.tensor(pos, dtype=torch.long), [len(ex) for ex in examples])


def pack_indices(lengths: list[int], order: list[int], batch_tokens: int) -> list[list[int]]:
    """Greedy in-order packing of ``order`` (indices into ``lengths``) into groups of at most ``batch_tokens``."""
    groups: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        n = lengths[i]
        if n > batch_tokens:
            raise InputError(f"an example of {n} tokens does not fit --batch-tokens {batch_tokens}; raise "
                             "--batch-tokens to at least --max-seq-len")
        if cur and used + n > batch_tokens:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class Schedule:
    """The deterministic sequence of micro-batches (lists of example indices) over epochs."""

    def __init__(self, lengths: list[int], batch_tokens: int, seed: int) -> None:
        self.lengths, self.batch_tokens, self.seed = lengths, batch_tokens, seed
        self._epochs: list[list[list[int]]] = []

    def epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            k = len(self._epochs)
            self._epochs.append(pack_indices(self.lengths, epoch_order(len(self.lengths), self.seed, k),
                                             self.batch_tokens))
        return self._epochs[e]

    def micro_batch(self, g: int) -> tuple[int, list[int]]:
        """``(epoch, example indices)`` of global micro-batch ``g``."""
        e = 0
        while g >= len(self.epoch(e)):
            g -= len(self.epoch(e))
            e += 1
        return e, self.epoch(e)[g]

    def micro_batches_in(self, epochs: int) -> int:
        return sum(len(self.epoch(e)) for e in range(epochs))


def rank_batches(picks: list[tuple[int, list[int]]], lengths: list[int], batch_tokens: int,
                 world: int) -> list[list[list[int]]]:
    """Each rank's micro-batches (lists of example indices) for one optimizer step made of the global
    micro-batches ``picks`` (``(epoch, indices)``, from :meth:`Schedule.micro_batch`).

    One rank keeps the global micro-batches as they are. Several ranks each get a token-balanced share of the
    step's examples (:func:`quantforge.distributed.partition`, in schedule order), packed greedily in that order
    into micro-batches of at most ``batch_tokens``, a new one starting at each epoch change as in the global
    schedule. The split only moves examples between micro-batches, so the step's summed loss and gradient are
    those of the global micro-batches (up to the order of float additions).
    """
    if world == 1:
        return [[idx for _, idx in picks]]
    items = [(epoch, i) for epoch, idx in picks for i in idx]
    owners = partition([lengths[i] for _, i in items], world)
    shares: list[list[list[int]]] = []
    for r in range(world):
        mine = [(epoch, i) for (epoch, i), o in zip(items, owners, strict=True) if o == r]
        groups: list[list[int]] = []
        for epoch in dict.fromkeys(e for e, _ in mine):
            groups += pack_indices(lengths, [i for e, i in mine if e == epoch], batch_tokens)
        shares.append(groups)
    return shares


def dummy_batch() -> Batch:
    """A one-token batch without targets (its loss is 0 and reaches no gradient): what a rank with no examples
    left runs so that every rank of a sharded model makes the same number of forward/backward passes."""
    zero = torch.zeros(1, dtype=torch.long)
    return Batch(zero, torch.full((1,), -100, dtype=torch.long), zero.clone(), [1])
