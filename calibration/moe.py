"""Mixture-of-experts layers for calibration: the experts of each layer as three 2-D weights laid out exactly like
llama.cpp's ``ffn_{gate,up,down}_exps`` tensors (experts stacked row block after row block), so each stacked tensor
is one weight to measure and one planner decision, and the importance matrix counts the tokens routed to each
expert separately, as llama-imatrix does for ``MUL_MAT_ID``. Imported only while calibrating (it needs torch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

KINDS = ("gate", "up", "down")
"""The stacked tensors of one layer, by their GGUF kind (``ffn_{kind}_exps``)."""

ExpertSink = Callable[[str, int, Any], None]
"""``sink(kind, expert, x)``: the input rows ``x`` one expert's ``kind`` projection sees in a forward."""


class _Slot(torch.nn.Module):
    """Holds one stacked weight as ``.weight`` (what calibration's hooks and swaps act on)."""

    def __init__(self, weight: Any) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)


class StackedExperts(torch.nn.Module):
    """Drop-in for a transformers 5 experts module (3-D ``gate_up_proj`` ``[E, 2*ff, H]`` and ``down_proj``
    ``[E, H, ff]``, called with the routed ``top_k_index`` / ``top_k_weights``): the same forward, with the
    weights held as ``gate_exps`` / ``up_exps`` ``[E*ff, H]`` and ``down_exps`` ``[E*H, ff]``."""

    def __init__(self, experts: Any) -> None:
        super().__init__()
        gate_up = experts.gate_up_proj.detach()
        n_exp, two_ff, hidden = gate_up.shape
        ff = two_ff // 2
        self.n_experts, self.ff, self.hidden = n_exp, ff, hidden
        self.gate_exps = _Slot(gate_up[:, :ff].reshape(n_exp * ff, hidden))
        self.up_exps = _Slot(gate_up[:, ff:].reshape(n_exp * ff, hidden))
        self.down_exps = _Slot(experts.down_proj.detach().reshape(n_exp * hidden, ff))
        self.act_fn = experts.act_fn
        self.sink: ExpertSink | None = None

    def slots(self) -> dict[str, Any]:
        return {"gate": self.gate_exps, "up": self.up_exps, "down": self.down_exps}

    def forward(self, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
        gate = self.gate_exps.weight.view(self.n_experts, self.ff, self.hidden)
        up = self.up_exps.weight.view(self.n_experts, self.ff, self.hidden)
        down = self.down_exps.weight.view(self.n_experts, self.hidden, self.ff)
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            token_idx, slot = torch.where(top_k_index == e)
            x = hidden_states[token_idx]
            h = self.act_fn(F.linear(x, gate[e])) * F.linear(x, up[e])
            if self.sink is not None:
                self.sink("gate", e, x)
                self.sink("up", e, x)
                self.sink("down", e, h)
            y = F.linear(h, down[e]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def stack_experts(model: Any) -> dict[str, StackedExperts]:
    """Replace every 3-D experts module of ``model`` by a :class:`StackedExperts` (same outputs); returns them by
    module name. Dense models are left as they are (empty result)."""
    found = [(name, m) for name, m in model.named_modules()
             if getattr(getattr(m, "gate_up_proj", None), "ndim", 0) == 3
             and getattr(getattr(m, "down_proj", None), "ndim", 0) == 3]
    out = {}
    for name, module in found:
        parent_name, _, attr = name.rpartition(".")
        stacked = StackedExperts(module).to(module.gate_up_proj.device)
        setattr(model.get_submodule(parent_name), attr, stacked)
        out[name] = stacked
    return out


def layer_experts(layer: Any) -> StackedExperts | None:
    """The stacked experts of one decoder layer, if it has any."""
    for m in layer.modules():
        if isinstance(m, StackedExperts):
            return m
    return None
