"""Run a Hugging Face decoder-only causal LM one piece at a time: embed, layer 0 .. N-1, head.

Activations are carried between layers by the caller, so a stage can push every chunk through layer ``i``
before touching layer ``i + 1`` (only one layer needs to be on the accelerator), and can restart from the
cached input of any layer. Weights stay on the CPU unless the whole model fits the device
(``resident``); otherwise each piece is moved to the device for its turn.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedArch

_SCALED_EMBEDDING = ("gemma", "gemma2")
"""Models whose decoder multiplies the token embeddings by sqrt(hidden) outside the embedding module."""
_GEMMA = ("gemma", "gemma2", "gemma3", "gemma3_text")
"""Models that scale the embeddings by sqrt(hidden) at all (Gemma 3 does it inside its embedding module)."""


@dataclass
class Context:
    """Per-sequence-length inputs shared by every layer: positions, rotary tables, attention masks."""

    position_ids: Any
    position_embeddings: Any
    masks: dict[str, Any]


def load_model(path: Any, dtype: Any = None, device: Any = None, n_params: int | None = None) -> Any:
    """The HF causal LM of a checkpoint folder in ``dtype`` (float32 by default), eval mode: on the CPU, or
    loaded straight onto ``device`` (a GPU) when ``n_params`` weights of that dtype fit it with room to spare,
    so no host copy of the whole model is made."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    dev = torch.device(device) if device is not None else None
    if (dev is not None and dev.type == "cuda" and n_params is not None
            and _fits(n_params * torch.empty((), dtype=dtype).element_size(), dev)):
        # the checkpoint's own dtype crosses to the GPU (half the bytes of float32), the cast runs there
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map={"": str(dev)}).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


class DecoderRunner:
    """Piecewise forward (and backward) of a ``*ForCausalLM`` whose decoder has ``layers``, ``rotary_emb``
    and ``norm`` (Llama, Mistral, Qwen2/3, Gemma2 and relatives)."""

    def __init__(self, model: Any, device: str = "cpu", resident: bool | None = None) -> None:
        import torch

        self.model = model
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        for attr in ("layers", "embed_tokens", "norm", "rotary_emb"):
            if not hasattr(decoder, attr):
                raise UnsupportedArch(f"{type(model).__name__} has no decoder.{attr}; layer-wise calibration "
                                      "supports Llama/Mistral/Qwen/Gemma-style decoders")
        self.decoder = decoder
        self.layers = decoder.layers
        from .moe import stack_experts

        stack_experts(model)
        self.lm_head = model.get_output_embeddings()
        self.device = torch.device(device)
        if resident is None:
            resident = self.device.type == "cpu" or _fits_device(model, self.device)
        self.resident = resident
        self._always = [decoder.embed_tokens, decoder.norm, decoder.rotary_emb, self.lm_head]
        if resident:
            model.to(self.device)
        else:
            for m in self._always:
                m.to(self.device)

    @property
    def embed_scale(self) -> float:
        """The factor between the embedding rows and the hidden states entering layer 0."""
        gemma = getattr(self.config, "model_type", "") in _GEMMA
        return float(self.config.hidden_size) ** 0.5 if gemma else 1.0

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> Any:
        return self.lm_head.weight.dtype

    @property
    def tied(self) -> bool:
        return self.lm_head.weight.data_ptr() == self.decoder.embed_tokens.weight.data_ptr()

    @contextlib.contextmanager
    def on_device(self, i: int) -> Iterator[Any]:
        """Layer ``i`` on the device for the block (moved back to the CPU afterwards unless resident)."""
        layer = self.layers[i]
        if not self.resident:
            layer.to(self.device)
        try:
            yield layer
        finally:
            if not self.resident:
                layer.to("cpu")

    def embed(self, ids: Any) -> Any:
        """``[B, T]`` token ids -> ``[B, T, H]`` hidden states entering layer 0."""
        import torch

        h = self.decoder.embed_tokens(torch.as_tensor(ids, device=self.device))
        if getattr(self.config, "model_type", "") in _SCALED_EMBEDDING:
            h = h * torch.tensor(math.sqrt(self.config.hidden_size), dtype=h.dtype)
        return h

    def context(self, h: Any) -> Context:
        """Positions, rotary tables and causal masks for hidden states ``h`` of shape ``[B, T, H]``."""
        import torch
        from transformers import masking_utils

        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        types = getattr(self.config, "layer_types", None)
        if types and "layer_type" in inspect.signature(self.decoder.rotary_emb.forward).parameters:
            # Gemma 3: local and global layers rotate with different bases
            pe = {t: self.decoder.rotary_emb(h, pos, t) for t in sorted(set(types))}
        else:
            pe = self.decoder.rotary_emb(h, position_ids=pos)
        kw = {"config": self.config, "inputs_embeds": h, "attention_mask": None, "past_key_values": None,
              "position_ids": pos}
        masks = {"full_attention": masking_utils.create_causal_mask(**kw)}
        if "sliding_attention" in (getattr(self.config, "layer_types", None) or ()):
            masks["sliding_attention"] = masking_utils.create_sliding_window_causal_mask(**kw)
        return Context(pos, pe, masks)

    def layer(self, i: int, h: Any, ctx: Context) -> Any:
        """Hidden states leaving layer ``i`` (the layer must be on the device: see :meth:`on_device`)."""
        types = getattr(self.config, "layer_types", None)
        mask = ctx.masks.get(types[i] if types else "full_attention", ctx.masks["full_attention"])
        pe = ctx.position_embeddings
        if isinstance(pe, dict):
            pe = pe[types[i]]
        out = self.layers[i](h, attention_mask=mask, position_ids=ctx.position_ids, position_embeddings=pe,
                             use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def head(self, h: Any) -> Any:
        """float32 logits ``[B, T, V]`` from the hidden states leaving the last layer."""
        import torch

        logits = self.lm_head(self.decoder.norm(h)).float()
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward_from(self, start: int, h: Any, ctx: Context | None = None) -> Any:
        """Logits of the model run from layer ``start`` on, given the input ``h`` of that layer."""
        ctx = ctx or self.context(h)
        for i in range(start, self.n_layers):
            with self.on_device(i):
                h = self.layer(i, h, ctx)
        return self.head(h)


def _fits_device(model: Any, device: Any) -> bool:
    """Whether ``model`` can stay on ``device``. Weights already there count as fitting (``load_model`` put
    them there after checking); only the rest is weighed against the free memory, which no longer includes
    the weights already moved."""
    if device.type != "cuda":
        return True
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if not _on(p.device, device))
    return rest == 0 or _fits(rest, device)


def _on(where: Any, device: Any) -> bool:
    return where.type == device.type and (device.index is None or where.index == device.index)


def _fits(nbytes: int, device: Any) -> bool:
    """Whether ``nbytes`` of weights leave room on ``device`` for activations, gradients and codec work."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.6 * free
