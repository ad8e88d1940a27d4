"""Our decoder against transformers' model on tiny random checkpoints of every supported family."""

from __future__ import annotations

import pytest
import torch

from quantforge.train.attention import PackInfo
from quantforge.train.loading import load_model
from quantforge.train.lora import LoraSpec
from helpers.train_models import ARCHS


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_packed_logits_match_transformers(arch, tiny_models):
    """Three examples packed into one sequence give the logits transformers computes for each alone (fp32,
    16-bit-free base): positions restart per example and no token attends across examples."""
    hf = _hf(tiny_models[arch])
    ours = load_model(tiny_models[arch], base_format="f32", device="cpu", dtype="f32").eval()
    gen = torch.Generator().manual_seed(1)
    lens = [7, 12, 3]
    ids = [torch.randint(0, 96, (n,), generator=gen) for n in lens]
    with torch.no_grad():
        ref = torch.cat([hf(input_ids=x[None]).logits[0] for x in ids])
        pos = torch.cat([torch.arange(n) for n in lens])
        got = ours.logits(ours(torch.cat(ids), pos, PackInfo.from_lengths(lens, "cpu")))
    # measured: <= 1.3e-6 on every family (fp32 accumulation-order noise)
    assert (got - ref).abs().max().item() < 1e-5


def test_nf4_base_matches_dequantized_weights(tiny_models):
    """With an NF4 base, each projection's weight is exactly the NF4 round trip of the checkpoint's weight."""
    from quantforge.kernels.qweight import QuantWeight
    from quantforge.model_source import ModelSource

    model = load_model(tiny_models["llama"], device="cpu", dtype="f32", lora=LoraSpec(rank=4))
    src = ModelSource.open(tiny_models["llama"])
    proj = model.layers[1].mlp.down_proj
    want = QuantWeight.quantize(src.get("model.layers.1.mlp.down_proj.weight"), "nf4").dequantize(torch.float32)
    assert proj.base.fmt == "nf4" and proj.base.double_quant
    assert torch.equal(proj.base.dequantize(torch.float32), want)
    assert sorted(n.split(".")[-1] for n in model.lora_modules())[:2] == ["down_proj", "down_proj"]
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
