"""Chunked cross-entropy (logits computed block by block, hand-written backward) against autograd of the naive
formulation with full float64 logits: ignore index, Gemma-2 soft-capping, both reductions, several blocks."""

from __future__ import annotations

import pytest
import torch
from quantforge.kernels import cross_entropy as ce


def naive(hidden, head, labels, ignore_index=-100, softcap=None, reduction="mean"):
    logits = hidden @ head.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(fn, hidden, head, labels, train_head=True):
    h = hidden.clone().requires_grad_(True)
    w = head.clone().requires_grad_(train_head)
    loss = fn(h, w, labels)
    (loss * 1.7).backward()
    return loss.detach(), h.grad, w.grad


def data(N=29, d=12, V=83, dtype=torch.float32, ignore=(1, 2, 17)):
    hidden = torch.randn(N, d, dtype=dtype)
    head = (torch.randn(V, d) * 0.7).to(dtype)
    labels = torch.randint(0, V, (N,))
    labels[list(ignore)] = -100
    labels[0] = V - 1  # the last vocabulary row, in the last vocab block
    return hidden, head, labels


@pytest.mark.parametrize("softcap,reduction,chunks", [
    (None, "mean", (4096, 32768)),  # one block
    (3.0, "mean", (8, 32)),         # 4 x 3 blocks, uneven edges
    (None, "sum", (29, 20)),        # one token block, 5 vocab blocks
    (3.0, "sum", (7, 1000)),        # 5 token blocks, one vocab block
], ids=["one-block", "softcap-grid", "vocab-blocks-sum", "softcap-token-blocks-sum"])
def test_fp32_matches_naive(softcap, reduction, chunks):
    hidden, head, labels = data()
    kw = dict(softcap=softcap, reduction=reduction)
    loss, dh, dw = run(lambda h, w, lab: ce.chunked_cross_entropy(h, w, lab, chunk_size=chunks[0],
                                                                  vocab_chunk=chunks[1], **kw), hidden, head, labels)
    rl, rdh, rdw = run(lambda h, w, lab: naive(h, w, lab, **kw), hidden.double(), head.double(), labels)
    assert loss.dtype == torch.float32
    assert rel(loss, rl) < 1e-6
    assert rel(dh, rdh) < 1e-5 and rel(dw, rdw) < 1e-5
    assert (dh[[1, 2, 17]] == 0).all()  # ignored tokens get no gradient


def test_frozen_head_gets_no_grad_and_custom_ignore_index():
    hidden, head, labels = data(N=5, V=40, ignore=())
    labels[3] = 7
    loss, dh, dw = run(lambda h, w, lab: ce.chunked_cross_entropy(h, w, lab, ignore_index=7, chunk_size=2,
                                                                  vocab_chunk=16), hidden, head, labels, False)
    rl, rdh, _ = run(lambda h, w, lab: naive(h, w, lab, ignore_index=7), hidden.double(), head.double(), labels,
                     False)
    assert dw is None
    assert rel(loss, rl) < 1e-6 and rel(dh, rdh) < 1e-5


def test_single_token():
    hidden, head, labels = data(N=1, V=19, ignore=())
    loss, dh, dw = run(lambda h, w, lab: ce.chunked_cross_entropy(h, w, lab, softcap=2.0, vocab_chunk=8),
                       hidden, head, labels)
    rl, rdh, rdw = run(lambda h, w, lab: naive(h, w, lab, softcap=2.0), hidden.double(), head.double(), labels)
    assert rel(loss, rl) < 1e-6 and rel(dh, rdh) < 1e-5 and rel(dw, rdw) < 1e-5


def test_bf16_within_rounding():
    """bf16 inputs: the loss matches the float64 loss of bf16-rounded logits (the kernel's input) to float32
    rounding; the gradients are bf16 matmuls of bf16-rounded dlogits, so they sit within a few bf16 steps."""
    hidden, head, labels = data(N=33, d=16, V=70, dtype=torch.bfloat16)
    loss, dh, dw = run(lambda h, w, lab: ce.chunked_cross_entropy(h, w, lab, softcap=5.0, chunk_size=16,
                                                                  vocab_chunk=32), hidden, head, labels)
    logits = (hidden @ head.t()).double()  # what the kernels read: the bf16 matmul's logits
    ref = torch.nn.functional.cross_entropy(5.0 * torch.tanh(logits / 5.0), labels)
    assert abs(loss.item() - ref.item()) < 1e-6 * abs(ref.item())
    rl, rdh, rdw = run(lambda h, w, lab: naive(h, w, lab, softcap=5.0), hidden.double(), head.double(), labels)
    assert dh.dtype == dw.dtype == torch.bfloat16
    assert rel(dh, rdh) < 2.0 ** -7 and rel(dw, rdw) < 2.0 ** -7


def test_reference_matches_naive_and_errors():
    from quantforge.errors import InputError

    hidden, head, labels = data()
    assert rel(ce.chunked_cross_entropy_reference(hidden, head, labels, softcap=4.0),
               naive(hidden.double(), head.double(), labels, softcap=4.0)) < 1e-6
    with pytest.raises(InputError):
        ce.chunked_cross_entropy(hidden, head, labels[:-1])
    with pytest.raises(InputError):
        ce.chunked_cross_entropy(hidden, head, labels, reduction="none")
