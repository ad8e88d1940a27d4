"""The weights calibration measures (one :class:`TensorRef` per quantizable weight, with its candidate formats)
and the per-shape inputs every layer call shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import candidates as cand
from .hooks import linear_modules
from .runner import Context, DecoderRunner


@dataclass
class TensorRef:
    """A weight the planner chooses a format for, and the module that holds it."""

    gguf_name: str
    hf_name: str
    kind: str
    layer: int | None
    module: Any
    candidates: list[str]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.module.weight.shape)  # type: ignore[return-value]


def tensor_refs(runner: DecoderRunner, spec: Any, requested: list[str]) -> list[TensorRef]:
    """Every quantizable weight: the linears of each layer, the token embedding, and an untied output."""
    from ..arch import gguf_name

    names = {id(m): n for n, m in runner.model.named_modules()}
    refs: list[TensorRef] = []
    emb = runner.decoder.embed_tokens
    row = int(emb.weight.shape[1])
    refs.append(TensorRef("token_embd.weight", names[id(emb)] + ".weight", "token_embd", None, emb,
                          cand.gguf_candidates(requested, row, has_imatrix=False, tensor="token_embd.weight")))
    for i, layer in enumerate(runner.layers):
        for _, mod in linear_modules(layer).items():
            hf = names[id(mod)] + ".weight"
            g = gguf_name(spec, hf)
            if g is None:
                continue
            n_in = int(mod.weight.shape[1])
            types = cand.gguf_candidates(requested, n_in)
            if "nf4" in requested:
                types = [*types[:-1], "nf4", types[-1]]
            refs.append(TensorRef(g, hf, g.split(".")[2], i, mod, types))
        refs.extend(_expert_refs(layer, i, names, requested))
    if not runner.tied:
        head = runner.lm_head
        refs.append(TensorRef("output.weight", names[id(head)] + ".weight", "output", None, head,
                              cand.gguf_candidates(requested, int(head.weight.shape[1]), has_imatrix=False,
                                                  tensor="output.weight")))
    return refs


def _expert_refs(layer: Any, i: int, names: dict[int, str], requested: list[str]) -> list[TensorRef]:
    """One ref per stacked expert tensor of layer ``i`` (``blk.i.ffn_{gate,up,down}_exps``), if it has experts."""
    from .moe import layer_experts

    experts = layer_experts(layer)
    if experts is None:
        return []
    out = []
    for kind, slot in experts.slots().items():
        g = f"blk.{i}.ffn_{kind}_exps.weight"
        out.append(TensorRef(g, names[id(slot)] + ".weight", f"ffn_{kind}_exps", i, slot,
                             cand.gguf_candidates(requested, int(slot.weight.shape[1]))))
    return out


def batches(chunks: list[list[int]], size: int) -> list[list[list[int]]]:
    return [chunks[i:i + size] for i in range(0, len(chunks), size)]


class Contexts:
    """One :class:`Context` per batch shape."""

    def __init__(self, runner: DecoderRunner) -> None:
        self.runner = runner
        self._cache: dict[tuple[int, int], Context] = {}

    def __call__(self, h: Any) -> Context:
        key = (int(h.shape[0]), int(h.shape[1]))
        if key not in self._cache:
            self._cache[key] = self.runner.context(h)
        return self._cache[key]
