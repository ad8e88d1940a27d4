"""Padding-free packing: a packed micro-batch is the same computation as its examples run one by one."""

from __future__ import annotations

import pytest
import torch

from quantforge.train.data import Example
from quantforge.train.loading import load_model
from quantforge.train.lora import LoraSpec
from quantforge.train.packing import make_batch, pack_indices


def _examples(vocab, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lens:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        mask = [0] * (n // 3) + [1] * (n - n // 3)
        out.append(Example(ids, mask))
    return out


def _loss_and_grads(model, examples):
    model.zero_grad(set_to_none=True)
    ids, labels, pos, pack = make_batch(examples).to(model.device)
    loss = model.loss(ids, pos, labels, pack)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_packed_batch_equals_examples_one_by_one(arch, tiny_models):
    model = load_model(tiny_models[arch], base_format="f32", dtype="f32", device="cpu", lora=LoraSpec(rank=4))
    with torch.no_grad():
        for m in model.lora_modules().values():
            m.lora_B.normal_(0, 0.05)
    model.train()
    exs = _examples(96, [9, 14, 5])
    packed_loss, packed_grads = _loss_and_grads(model, exs)
    total, grads = 0.0, None
    for ex in exs:
        loss, g = _loss_and_grads(model, [ex])
        total += loss
        grads = g if grads is None else {k: grads[k] + g[k] for k in g}
    # measured: loss ~1e-6 apart, gradients ~1e-7 (fp32 summation order)
    assert abs(float(packed_loss) - float(total)) < 1e-5
    for k in grads:
        assert (packed_grads[k] - grads[k]).abs().max().item() < 1e-5, k
    assert any(g.abs().max() > 0 for g in grads.values())


def test_batch_layout_and_greedy_packing():
    exs = _examples(50, [4, 3])
    b = make_batch(exs)
    assert b.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2] and b.lengths == [4, 3]
    assert b.labels[3] == -100 and b.labels[6] == -100
    assert pack_indices([5, 4, 3, 6], [0, 1, 2, 3], 9) == [[0, 1], [2, 3]]


def test_triton_interpreter_path_matches_reference(tiny_models, monkeypatch):
    """The same training step through the Triton kernels (interpreted on CPU) and the PyTorch references."""
    model = load_model(tiny_models["qwen3"], base_format="nf4", dtype="f32", device="cpu", lora=LoraSpec(rank=4))
    with torch.no_grad():
        for m in model.lora_modules().values():
            m.lora_B.normal_(0, 0.05)
    model.train()
    exs = _examples(96, [6, 5])
    ref_loss, ref_grads = _loss_and_grads(model, exs)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tri_loss, tri_grads = _loss_and_grads(model, exs)
    assert abs(float(tri_loss) - float(ref_loss)) < 1e-4 * max(1.0, abs(float(ref_loss)))
    for k in ref_grads:
        assert torch.allclose(tri_grads[k], ref_grads[k], rtol=1e-3, atol=1e-5), k
