"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer: base weights, LoRA, gradients and AdamW states
sharded across the ranks, for models whose quantized base does not fit one GPU.

Units: every decoder layer is one ``fully_shard`` unit; the embedding, the final norm and the output head belong
to the root unit, :class:`LossModule`, whose forward is the model's loss (so the head is gathered while the loss
uses it).

The quantized base weights are not parameters of the model (a :class:`~quantforge.kernels.qweight.QuantWeight`
holds packed bytes beside the module), so FSDP2 would not see them. :func:`shard_layer` therefore registers each
projection's packed storage ``QuantWeight.data`` as a frozen parameter ``base_data`` of its
:class:`~.lora.LoraLinear` before sharding the layer: ``(out, bytes per row)`` uint8 for NF4/FP4 and GGUF
formats, ``(out, in)`` for 16-bit ones. Every layout keeps one output feature per row, so FSDP2's dim-0 shard is
a block of whole rows; FSDP2 all-gathers it in its own dtype inside the layer's single all-gather (mixed dtypes
travel as bytes) before the layer's forward and again before its backward, and frees the gathered copy after
each. A forward pre-hook points the ``QuantWeight`` at the gathered tensor. Its small side table
(``extra["aux"]``: the 16 code values and, with double quantization, the nested absmax, about 1/4096 byte per
weight) stays replicated. Frozen 16-bit tensors (norms, biases, embedding, head) are sharded the same way.

Gradient reduce-scatters sum (no averaging): each rank's loss is already divided by the step's global target
count. Activation checkpointing is torch's non-reentrant composable ``checkpoint`` on each layer (FSDP2
re-gathers the layer in its pre-backward hook and the recomputation reuses it); the model's own offloading
checkpoint is turned off. A sharded model runs only through its :class:`LossModule`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .lora import LoraLinear
from .model import CausalLM


class LossModule(nn.Module):
    """The root FSDP unit: ``forward`` is :meth:`CausalLM.loss` (summed token loss)."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                pack: Any) -> torch.Tensor:
        return self.model.loss(input_ids, position_ids, labels, pack)


def device_mesh(device_type: str) -> Any:
    """A 1-D mesh over every rank of the initialized default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise InputError("sharding needs a distributed job: launch with torchrun (or call "
                         "quantforge.train.init_distributed() first)")
    return init_device_mesh(device_type, (dist.get_world_size(),))


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _bind_base(module: LoraLinear, args: Any) -> None:
    """Forward pre-hook: the QuantWeight reads the gathered rows FSDP2 put in ``base_data``."""
    module.base.data = module.base_data


def _expose_base(m: LoraLinear) -> None:
    m.register_parameter("base_data", nn.Parameter(m.base.data, requires_grad=False))
    m.register_forward_pre_hook(_bind_base)


def _sum_reduction(module: nn.Module) -> None:
    """Reduce-scatter with a plain sum (gloo has no AVG/PREMUL_SUM; the loss is globally normalized already)."""
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)


def shard_layer(layer: nn.Module, mesh: Any, checkpointing: bool = True) -> nn.Module:
    """Make ``layer`` one FSDP2 unit, its quantized base weights included (see the module docstring); with
    ``checkpointing`` its activations are recomputed in the backward. Returns the same module, sharded."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import fully_shard

    projections = [m for m in layer.modules() if isinstance(m, LoraLinear)]
    for m in projections:
        _expose_base(m)
    if checkpointing:
        checkpoint(layer)
    fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    for m in projections:
        m.base.data = m.base_data  # drop the full copy: only this rank's rows stay
    _sum_reduction(layer)
    return layer


def layer_sharder(gradient_checkpointing: bool = True) -> Callable[[nn.Module], nn.Module]:
    """A ``load_model(on_layer=...)`` hook that shards each decoder layer as soon as it is built, so a rank
    never holds more than one whole quantized layer (plus its shards of the others)."""
    meshes: list[Any] = []

    def hook(layer: nn.Module) -> nn.Module:
        if not meshes:
            meshes.append(device_mesh(next(layer.parameters()).device.type))
        return shard_layer(layer, meshes[0], gradient_checkpointing)

    return hook


def shard_model(model: CausalLM, checkpointing: bool = True) -> LossModule:
    """Shard every layer not sharded yet (at load time by :func:`layer_sharder`), then the rest of the model as
    the root unit; returns the root, through which the model must run from now on."""
    done = [layer for layer in model.layers if is_sharded(layer)]
    mesh = next(done[0].parameters()).device_mesh if done else device_mesh(model.device.type)
    for layer in model.layers:
        if not is_sharded(layer):
            shard_layer(layer, mesh, checkpointing)
    model.gradient_checkpointing = False  # each layer has FSDP-aware checkpointing (or none) instead
    from torch.distributed.fsdp import fully_shard

    root = LossModule(model)
    fully_shard(root, mesh=mesh)
    _sum_reduction(root)
    return root
