"""Causal attention over packed examples: no token attends across an example boundary.

Tokens are flat: ``q`` ``(T, h, hd)``, ``k`` / ``v`` ``(T, kv, hd)``, examples delimited by ``cu_seqlens``
``(N+1,)`` int32 (``cu_seqlens[i]`` is where example ``i`` starts). Backends, picked per call:

* CUDA, 16-bit, no soft-capping: PyTorch's FlashAttention varlen kernel (``torch.nn.attention.varlen``) when the
  installed torch has it, with the sliding window passed through;
* otherwise one ``scaled_dot_product_attention`` per example (causal, GQA by head repetition), or, when the model
  soft-caps attention logits (Gemma-2) or uses a sliding window, an explicit fp32 softmax per example.

Every backend computes the same function; the per-example paths are the reference the tests compare with HF.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PackInfo:
    """Where each packed example starts: ``cu_seqlens`` on the model's device and as a Python list."""

    cu_seqlens: torch.Tensor
    bounds: list[int]
    max_len: int

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device | str) -> PackInfo:
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        return cls(cu, bounds, max(lengths))


@functools.lru_cache(maxsize=1)
def _varlen() -> tuple[object, set[str]] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: PackInfo, scale: float,
                      window: int | None) -> torch.Tensor:
    fn, params = _varlen()
    n_rep = q.shape[1] // k.shape[1]
    kwargs: dict[str, object] = {"scale": scale}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = n_rep > 1
    else:
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    if "window_size" in params:
        kwargs["window_size"] = (-1 if window is None else window - 1, 0)
    else:
        kwargs["is_causal"] = True
    return fn(q, k, v, pack.cu_seqlens, pack.cu_seqlens, pack.max_len, pack.max_len, **kwargs)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None,
           softcap: float | None) -> torch.Tensor:
    """One example, ``(n, h, hd)``: scores in fp32, soft-capped, causal (and windowed) mask, softmax, ``@ v``."""
    n = q.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(n, device=q.device)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= (i[:, None] - i[None, :]) < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.einsum("hqk,khd->qhd", probs, v)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: PackInfo, scale: float,
                     window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention within each packed example; returns ``(T, h, hd)``."""
    if (q.is_cuda and softcap is None and q.dtype in (torch.bfloat16, torch.float16) and _varlen() is not None):
        return _varlen_attention(q, k, v, pack, scale, window)
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    outs = []
    for start, stop in zip(pack.bounds[:-1], pack.bounds[1:]):
        qs, ks, vs = q[start:stop], k[start:stop], v[start:stop]
        if softcap is not None or (window is not None and stop - start > window):
            outs.append(_eager(qs, ks, vs, scale, window, softcap))
        else:
            o = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                                               is_causal=True, scale=scale)
            outs.append(o.transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
