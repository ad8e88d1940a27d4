"""Plan files round-trip and reject malformed content."""

from __future__ import annotations

import pytest

from quantforge.errors import PlanError
from quantforge.plan import Plan, TensorChoice, load_plan, save_plan


def test_round_trip(tmp_path):
    plan = Plan(target="gguf", base_type="q4_k_m",
                tensors={"blk.0.attn_v.weight": TensorChoice("q6_k", 0.001, 1000, 6.5625)})
    p = save_plan(plan, tmp_path / "p.yaml")
    again = load_plan(p)
    assert again.to_dict() == plan.to_dict()
    assert again.gguf_types() == {"blk.0.attn_v.weight": "q6_k"}


@pytest.mark.parametrize("text, match", [
    ("version: 1\ntarget: gguf\ntypo: 3\n", "unknown keys"),
    ("version: 2\ntarget: gguf\n", "version"),
    ("version: 1\ntarget: gguf\ntensors: {a.weight: q9_k}\n", "unknown GGUF type"),
    ("version: 1\ntarget: bnb4\nskip_modules: lm_head\n", "list"),
    ("version: 1\ntarget: gguf\ntensors: {a.weight: {type: q4_k, extra: 1}}\n", "unknown keys"),
    ("- not a mapping\n", "mapping"),
])
def test_rejects(tmp_path, text, match):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    with pytest.raises(PlanError, match=match):
        load_plan(p)
