"""Activation checkpointing whose saved layer input waits in pinned CPU memory instead of on the GPU.

``offloaded_checkpoint(fn, *args)`` runs ``fn(*args)`` without recording a graph, as
``torch.utils.checkpoint`` does, and keeps only the inputs for the backward, where ``fn`` is re-run with grad
and back-propagated. On CUDA, every tensor argument of at least ``MIN_OFFLOAD_BYTES`` (the layer's hidden
states) is copied to pinned host memory on a side stream right after the forward, so its GPU memory is free
for the rest of the forward pass. In the backward, a layer's input comes back on the side stream; while the
layer recomputes and back-propagates, the input of the layer that ran before it is already being copied back
(double buffering: at most two offloaded inputs are on the GPU at once). On CPU it is plain checkpointing.

Gradients reach ``args`` that require grad (returned from the backward) and the parameters ``fn`` uses (through
a nested ``torch.autograd.backward``, as reentrant checkpointing does: use ``loss.backward()``, not
``torch.autograd.grad``). The RNG state is replayed, so dropout inside ``fn`` draws the same masks twice.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

from ..errors import InputError

MIN_OFFLOAD_BYTES = 1 << 20

_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_PENDING: list[weakref.ref] = []  # offloaded inputs in forward order, not yet consumed by a backward


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class _Offloaded:
    """One layer's offloaded tensor: its pinned host copy, and (once fetched) the device copy and its event."""

    def __init__(self, t: torch.Tensor):
        self.device = t.device
        stream = _side_stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            self.host.copy_(t, non_blocking=True)
            self.host_ready = torch.cuda.Event()
            self.host_ready.record(stream)
        t.record_stream(stream)  # the caching allocator must not reuse t's memory before the copy is done
        self.gpu: torch.Tensor | None = None
        self.gpu_ready: torch.cuda.Event | None = None

    def prefetch(self) -> None:
        if self.gpu is not None:
            return
        stream = _side_stream(self.device)
        with torch.cuda.stream(stream):
            stream.wait_event(self.host_ready)
            self.gpu = self.host.to(self.device, non_blocking=True)
            self.gpu_ready = torch.cuda.Event()
            self.gpu_ready.record(stream)

    def fetch(self) -> torch.Tensor:
        self.prefetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.gpu_ready)
        self.gpu.record_stream(current)
        gpu, self.gpu, self.host = self.gpu, None, None
        return gpu


def _offloadable(a) -> bool:
    return isinstance(a, torch.Tensor) and a.is_cuda and a.numel() * a.element_size() >= MIN_OFFLOAD_BYTES


def _prefetch_previous(record: _Offloaded) -> None:
    """Start copying back the input offloaded just before ``record`` (the layer whose backward comes next)."""
    alive = [r() for r in _PENDING]
    _PENDING[:] = [weakref.ref(r) for r in alive if r is not None and r is not record]
    alive = [r for r in alive if r is not None]
    if record in alive:
        i = alive.index(record)
        if i > 0:
            alive[i - 1].prefetch()


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, grad_anchor, *args):
        ctx.fn = fn
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_devices = sorted({a.device.index for a in args if isinstance(a, torch.Tensor) and a.is_cuda})
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.cuda_devices]
        with torch.no_grad():
            out = fn(*args)
        if not isinstance(out, torch.Tensor):
            raise InputError(f"offloaded_checkpoint: fn must return one tensor, got {type(out).__name__}")
        ctx.slots, kept, ctx.offloaded = [], [], []
        for a in args:
            if _offloadable(a):
                rec = _Offloaded(a)
                ctx.offloaded.append(rec)
                _PENDING[:] = [r for r in _PENDING if r() is not None] + [weakref.ref(rec)]
                ctx.slots.append(("offloaded", len(ctx.offloaded) - 1))
            elif isinstance(a, torch.Tensor):
                kept.append(a)
                ctx.slots.append(("saved", len(kept) - 1))
            else:
                ctx.slots.append(("const", a))
        ctx.save_for_backward(*kept)
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        fetched = [rec.fetch() for rec in ctx.offloaded]
        for rec in ctx.offloaded:
            _prefetch_previous(rec)
        inputs = []
        for (kind, v), needs in zip(ctx.slots, ctx.needs_input_grad[2:], strict=True):
            if kind == "const":
                inputs.append(v)
                continue
            t = (fetched if kind == "offloaded" else saved)[v].detach()
            inputs.append(t.requires_grad_(needs))
        with torch.random.fork_rng(devices=ctx.cuda_devices):
            torch.set_rng_state(ctx.cpu_rng)
            for d, state in zip(ctx.cuda_devices, ctx.cuda_rng, strict=True):
                torch.cuda.set_rng_state(state, d)
            with torch.enable_grad():
                out = ctx.fn(*inputs)
        if out.requires_grad:
            torch.autograd.backward(out, dout)
        grads = [t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs]
        return (None, None, *grads)


def offloaded_checkpoint(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``fn(*args)`` with its activations recomputed in the backward and its large tensor inputs held in pinned
    CPU memory meanwhile (CUDA); plain checkpointing on CPU. ``fn`` returns one tensor."""
    if not torch.is_grad_enabled():
        return fn(*args)
    # The anchor makes the output require grad even when no argument does (a frozen embedding's output), so the
    # backward still runs and reaches the parameters inside ``fn``.
    anchor = torch.empty(0, requires_grad=True)
    return _OffloadedCheckpoint.apply(fn, anchor, *args)
