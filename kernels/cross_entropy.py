"""Cross-entropy of ``hidden @ lm_head^T`` without ever holding the full logits.

The logits are computed one block of ``chunk_size`` tokens by ``vocab_chunk`` vocabulary rows at a time (a cuBLAS
matmul in the inputs' dtype, as ``nn.Linear`` would give them); a Triton kernel folds each block into a running
float32 log-sum-exp per token and picks the target logit. Gemma-2 soft-capping (``c * tanh(z / c)``) is applied
to each logit inside the kernels. Tokens whose label is ``ignore_index`` contribute nothing; ``reduction='mean'``
divides by the number of the others (as ``F.cross_entropy`` does; all ignored gives NaN, as it does too).

The forward saves ``hidden``, ``lm_head``, ``labels`` and one float32 log-sum-exp per token. The backward
recomputes each logits block, turns it in place into ``dlogits = scale * (softmax - onehot) * cap'`` with a
second kernel, and multiplies it into ``dhidden`` (and ``dlm_head`` when the head requires grad), block by
block; across several blocks both accumulate in float32. Peak extra memory is one logits block.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ._launch import pow2, use_triton
from ._triton import HAVE_TRITON, tl, triton

if HAVE_TRITON:
    from ._launch import cast_rtne, tanh_f32

    @triton.jit
    def _ce_fwd_kernel(LOGITS, stride_l, LABELS, RUN_MAX, RUN_SUM, TARGET, n_cols, col_off, softcap, ignore_index,
                       SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(LABELS + row)
        if label != ignore_index:
            base = LOGITS + row * stride_l
            m = tl.load(RUN_MAX + row)
            s = tl.load(RUN_SUM + row)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < n_cols
                z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                if SOFTCAP:
                    z = softcap * tanh_f32(z / softcap)
                z = tl.where(mask, z, float("-inf"))
                m_new = tl.maximum(m, tl.max(z, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
                m = m_new
            tl.store(RUN_MAX + row, m)
            tl.store(RUN_SUM + row, s)
            local = label - col_off
            if (local >= 0) & (local < n_cols):
                z = tl.load(base + local).to(tl.float32)
                if SOFTCAP:
                    z = softcap * tanh_f32(z / softcap)
                tl.store(TARGET + row, z)

    @triton.jit
    def _ce_bwd_kernel(LOGITS, stride_l, LABELS, LSE, SCALE, n_cols, col_off, softcap, ignore_index,
                       SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(LABELS + row)
        base = LOGITS + row * stride_l
        if label == ignore_index:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(base + cols, tl.zeros((BLOCK_V,), dtype=tl.float32).to(LOGITS.dtype.element_ty),
                         mask=cols < n_cols)
        else:
            lse = tl.load(LSE + row)
            scale = tl.load(SCALE)
            local = label - col_off
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < n_cols
                z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                if SOFTCAP:
                    t = tanh_f32(z / softcap)
                    g = tl.exp(softcap * t - lse) - tl.where(cols == local, 1.0, 0.0)
                    g = g * (1.0 - t * t)
                else:
                    g = tl.exp(z - lse) - tl.where(cols == local, 1.0, 0.0)
                tl.store(base + cols, cast_rtne(g * scale, LOGITS.dtype.element_ty), mask=mask)


_REDUCTIONS = ("mean", "sum")


def _check(hidden, lm_head, labels, reduction, chunk_size, vocab_chunk) -> None:
    if hidden.dim() != 2 or lm_head.dim() != 2 or hidden.shape[1] != lm_head.shape[1]:
        raise InputError(f"cross-entropy: expected hidden (N, d) and lm_head (V, d), got {tuple(hidden.shape)} and "
                         f"{tuple(lm_head.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise InputError(f"cross-entropy: labels must be ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if reduction not in _REDUCTIONS:
        raise InputError(f"cross-entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size < 1 or vocab_chunk < 1:
        raise InputError(f"cross-entropy: chunk sizes must be positive, got {chunk_size} and {vocab_chunk}")


def _spans(n: int, step: int):
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _block_v(n_cols: int) -> int:
    return min(pow2(n_cols), 4096)


def _forward(hidden, lm_head, labels, ignore_index, softcap, chunk_size, vocab_chunk):
    """Per-token float32 log-sum-exp and target logit."""
    N, V = hidden.shape[0], lm_head.shape[0]
    lse = torch.empty(N, device=hidden.device, dtype=torch.float32)
    target = torch.zeros(N, device=hidden.device, dtype=torch.float32)
    for t0, t1 in _spans(N, chunk_size):
        h = hidden[t0:t1]
        run_max = torch.full((t1 - t0,), float("-inf"), device=hidden.device, dtype=torch.float32)
        run_sum = torch.zeros(t1 - t0, device=hidden.device, dtype=torch.float32)
        for v0, v1 in _spans(V, vocab_chunk):
            logits = h @ lm_head[v0:v1].to(h.dtype).t()
            _ce_fwd_kernel[(t1 - t0,)](logits, logits.stride(0), labels[t0:t1], run_max, run_sum, target[t0:t1],
                                       v1 - v0, v0, float(softcap or 1.0), ignore_index,
                                       SOFTCAP=softcap is not None, BLOCK_V=_block_v(v1 - v0), num_warps=8)
            del logits
        lse[t0:t1] = run_max + torch.log(run_sum)
    return lse, target


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, lm_head, labels, ignore_index, softcap, chunk_size, vocab_chunk, reduction):
        lse, target = _forward(hidden, lm_head, labels, ignore_index, softcap, chunk_size, vocab_chunk)
        valid = labels != ignore_index
        loss = torch.where(valid, lse - target, 0.0).sum()
        n_valid = valid.sum().to(torch.float32)
        if reduction == "mean":
            loss = loss / n_valid
        ctx.save_for_backward(hidden, lm_head, labels, lse, n_valid)
        ctx.args = (ignore_index, softcap, chunk_size, vocab_chunk, reduction)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        hidden, lm_head, labels, lse, n_valid = ctx.saved_tensors
        ignore_index, softcap, chunk_size, vocab_chunk, reduction = ctx.args
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = dloss.to(torch.float32).reshape(1)
        if reduction == "mean":
            scale = scale / n_valid
        N, V = hidden.shape[0], lm_head.shape[0]
        t_spans, v_spans = _spans(N, chunk_size), _spans(V, vocab_chunk)
        dh = torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype) if need_dh else None
        dw_acc = None
        if need_dw:
            dw_acc = (torch.zeros(lm_head.shape, device=lm_head.device, dtype=torch.float32) if len(t_spans) > 1
                      else torch.empty(lm_head.shape, device=lm_head.device, dtype=hidden.dtype))
        for t0, t1 in t_spans:
            h = hidden[t0:t1]
            dh_acc = None
            for v0, v1 in v_spans:
                w = lm_head[v0:v1].to(h.dtype)
                dlogits = h @ w.t()
                _ce_bwd_kernel[(t1 - t0,)](dlogits, dlogits.stride(0), labels[t0:t1], lse[t0:t1], scale, v1 - v0,
                                           v0, float(softcap or 1.0), ignore_index, SOFTCAP=softcap is not None,
                                           BLOCK_V=_block_v(v1 - v0), num_warps=8)
                if need_dh:
                    if len(v_spans) == 1:
                        torch.mm(dlogits, w, out=dh[t0:t1])
                    elif dh_acc is None:
                        dh_acc = (dlogits @ w).float()
                    else:
                        dh_acc += dlogits @ w
                if need_dw:
                    if len(t_spans) == 1:
                        torch.mm(dlogits.t(), h, out=dw_acc[v0:v1])
                    else:
                        dw_acc[v0:v1] += dlogits.t() @ h
                del dlogits
            if dh_acc is not None:
                dh[t0:t1] = dh_acc
        dw = None if dw_acc is None else dw_acc.to(lm_head.dtype)
        return dh, dw, None, None, None, None, None, None


def chunked_cross_entropy_reference(hidden: torch.Tensor, lm_head: torch.Tensor, labels: torch.Tensor,
                                    ignore_index: int = -100, softcap: float | None = None, chunk_size: int = 4096,
                                    reduction: str = "mean", *, vocab_chunk: int = 32768) -> torch.Tensor:
    """The definition, with the full logits: ``F.cross_entropy(cap(float(hidden @ lm_head^T)), labels)``.
    The chunk sizes only shape the kernel path's work and are accepted here for the same signature."""
    _check(hidden, lm_head, labels, reduction, chunk_size, vocab_chunk)
    logits = (hidden @ lm_head.to(hidden.dtype).t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def chunked_cross_entropy(hidden: torch.Tensor, lm_head: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int = -100, softcap: float | None = None, chunk_size: int = 4096,
                          reduction: str = "mean", *, vocab_chunk: int = 32768) -> torch.Tensor:
    """Loss of ``hidden (N, d)`` through ``lm_head (V, d)`` against ``labels (N,)``, float32 scalar; logits exist
    only ``chunk_size x vocab_chunk`` at a time. Grads to ``hidden`` (and ``lm_head`` when it requires grad)."""
    _check(hidden, lm_head, labels, reduction, chunk_size, vocab_chunk)
    if not use_triton(hidden, lm_head, labels):
        return chunked_cross_entropy_reference(hidden, lm_head, labels, ignore_index, softcap, chunk_size,
                                               reduction, vocab_chunk=vocab_chunk)
    return _ChunkedCE.apply(hidden, lm_head, labels.contiguous(), int(ignore_index),
                            None if softcap is None else float(softcap), int(chunk_size), int(vocab_chunk),
                            reduction)
