"""Training on several processes (``torchrun``): data parallel over the LoRA gradients, or FSDP2 sharding.

Every rank runs the same loop over the same global schedule (:class:`~.packing.Schedule`): the examples, token
count and target count of an optimizer step do not depend on the number of ranks. Each step's examples are split
among the ranks (:func:`~.packing.rank_batches`, deterministic), every rank divides its summed token loss by the
step's *global* target count, and the ranks' gradients are summed, so the step's gradient is a single process's
(up to the order of float additions) and a run's adapter does not depend on how many GPUs trained it.

* ``ddp``: every rank holds the whole quantized model. The LoRA matrices are the only trainable tensors, so after
  the step's micro-batches their gradients are summed with one all-reduce per bucket (no hooks in the backward)
  and every rank applies the same optimizer step. A rank may hold fewer micro-batches than another.
* ``fsdp`` (``shard=True``): :mod:`.fsdp` shards the base weights, LoRA, gradients and AdamW states; every rank
  then makes the same number of forward/backward passes (a short rank runs a zero-weighted one-token batch).

Only rank 0 writes files and reports progress. Checkpoints hold gathered (full) tensors and every rank's RNG
state, so a checkpoint resumes on any number of ranks and in either mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from .. import distributed as dist_core
from ..errors import InputError
from .config import TrainConfig
from .model import CausalLM

#: Gradient elements summed per all-reduce (64 MiB of float32).
BUCKET_ELEMS = 1 << 24


@dataclass
class Parallel:
    """How this process takes part in a run: its group, the mode (``single``, ``ddp``, ``fsdp``) and, when
    sharded, the FSDP root the model runs through."""

    group: dist_core.Group = dist_core.SINGLE
    mode: str = "single"
    root: torch.nn.Module | None = None

    @property
    def world(self) -> int:
        return self.group.world

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "world": self.world}

    def loss(self, model: CausalLM, ids: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor,
             pack: Any) -> torch.Tensor:
        """Summed token loss of one packed batch (through the FSDP root when sharded)."""
        if self.root is not None:
            return self.root(ids, pos, labels, pack)
        return model.loss(ids, pos, labels, pack)

    def optimizer_config(self, cfg: TrainConfig) -> TrainConfig:
        """The config the optimizer is made from: sharded LoRA tensors (DTensors) take torch's AdamW, whose state
        FSDP2 shards; bitsandbytes' 8-bit optimizers work on plain tensors only."""
        if not self.sharded or cfg.optimizer == "adamw":
            return cfg
        if cfg.optimizer == "paged_adamw_8bit":
            raise InputError("--shard keeps LoRA and optimizer states sharded, which paged_adamw_8bit cannot read; "
                             "use --optimizer adamw (or auto) with --shard")
        return replace(cfg, optimizer="adamw")

    def sum(self, values: list[float]) -> list[float]:
        """Sums over ranks of a few floats (float64)."""
        if self.world == 1:
            return values
        return [float(v) for v in self.group.all_reduce_sum([torch.tensor(values, dtype=torch.float64)])[0]]

    def max(self, value: float | None) -> float | None:
        """The largest ``value`` over ranks (peak memory)."""
        if self.world == 1 or value is None:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.group.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def reduce_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum the LoRA gradients over ranks (``ddp``; FSDP2 reduce-scatters them in the backward)."""
        if self.world == 1 or self.sharded:
            return
        import torch.distributed as dist

        for grad_bucket in _buckets(params):
            flat = torch.cat([g.reshape(-1) for g in grad_bucket])
            dist.all_reduce(flat)
            offset = 0
            for g in grad_bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def grad_norm(self, total: torch.Tensor) -> float:
        """The clipped-gradient norm as a float (FSDP2 returns it as a replicated DTensor)."""
        return float(total.full_tensor() if hasattr(total, "full_tensor") else total)


def _buckets(params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Each parameter's gradient (zeros where this rank made none), in buckets of about BUCKET_ELEMS."""
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket.append(p.grad)
        size += p.grad.numel()
        if size >= BUCKET_ELEMS:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def init_distributed(device: str | None = None) -> dist_core.Group:
    """Join the job ``torchrun`` describes (a group of one without it) and, on CUDA, bind this process to GPU
    ``LOCAL_RANK``: call it before :func:`~.loading.load_model` in a script launched by torchrun."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist_core.current()
    return dist_core.init_from_env(device)


def setup(model: CausalLM, cfg: TrainConfig, shard: bool, group: dist_core.Group) -> Parallel:
    """The run's :class:`Parallel` for ``model`` in ``group``: shards the model (``shard``) or makes every
    rank's LoRA equal to rank 0's (``ddp``)."""
    if not group.distributed:
        return Parallel()
    dev = model.device
    if group.backend == "nccl" and (dev.type != "cuda" or dev.index != torch.cuda.current_device()):
        raise InputError(f"rank {group.rank} holds its model on {dev}, not on its own GPU "
                         f"cuda:{torch.cuda.current_device()}; call quantforge.train.init_distributed() before "
                         "load_model(device='cuda')")
    if group.backend == "gloo" and dev.type != "cpu":
        raise InputError(f"the process group runs gloo (CPU) but the model is on {dev}; join the job with the "
                         "model's device (init_distributed('cuda'))")
    from .fsdp import is_sharded, shard_model

    if shard:
        return Parallel(group, "fsdp", shard_model(model, cfg.gradient_checkpointing))
    if any(is_sharded(layer) for layer in model.layers):
        raise InputError("the model's layers were sharded while loading (layer_sharder); train it with shard=True")
    _broadcast_lora(model)
    return Parallel(group, "ddp")


def _broadcast_lora(model: CausalLM) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for m in model.lora_modules().values():
            dist.broadcast(m.lora_A.data, src=0)
            dist.broadcast(m.lora_B.data, src=0)


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` with sharded states gathered (a collective under FSDP: every rank calls it)."""
    sd = opt.state_dict()
    state = {i: {k: v.full_tensor().cpu() if _is_dtensor(v) else v for k, v in st.items()}
             for i, st in sorted(sd["state"].items())}
    return {"state": state, "param_groups": sd["param_groups"]}


def place_optimizer_state(sd: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """A full optimizer state laid out like ``params``: states of sharded parameters become this rank's shard
    (every rank holds the full state already, so no communication)."""
    from torch.distributed.tensor import distribute_tensor

    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        if not _is_dtensor(p):
            state[i] = st
            continue
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) else v for k, v in st.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def reseed(seed: int, step: int, rank: int) -> None:
    """RNG of a rank resuming a checkpoint made on another number of ranks (only LoRA dropout draws from it)."""
    torch.manual_seed(seed * 1_000_003 + step * 1009 + rank)
