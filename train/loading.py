"""Build a :class:`~.model.CausalLM` from a HF checkpoint, streaming one tensor at a time.

Each projection weight is read from the safetensors file on the CPU, moved to the device and handed to the
base layout, which turns it into a ``QuantWeight``; the 16-bit tensor is dropped right after, so the device never
holds a 16-bit copy of the model (peak: the quantized model plus one tensor).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import CorruptCheckpoint, InputError, PlanError
from ..model_source import ModelSource
from ..plan import Plan, load_plan
from .arch import PROJECTIONS, ArchConfig, arch_from_config
from .gguf_base import GgufFileLayout, GgufPlanLayout
from .layout import BaseLayout, Bnb4PlanLayout, UniformLayout
from .lora import LoraLinear, LoraSpec
from .model import CausalLM, DecoderLayer

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "f16": torch.float16, "fp16": torch.float16,
           "float16": torch.float16, "f32": torch.float32, "fp32": torch.float32, "float32": torch.float32}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def make_layout(base_format: str | None = "nf4", plan: str | os.PathLike[str] | Plan | None = None,
                double_quant: bool = True, base_gguf: str | os.PathLike[str] | None = None) -> BaseLayout:
    """The layout for a uniform ``base_format`` (``None``/``"16bit"``: compute dtype), a bnb4 ``plan``, a gguf
    ``plan`` (``base_format="gguf"``: its per-tensor types applied in memory) or a ``base_gguf`` file."""
    if base_gguf is not None:
        if plan is not None:
            raise InputError("--base-gguf is the base layout itself; leave out --plan")
        return GgufFileLayout(str(base_gguf))
    if plan is not None:
        src = None if isinstance(plan, Plan) else str(plan)
        loaded = plan if isinstance(plan, Plan) else load_plan(plan)
        if base_format == "gguf" or loaded.target == "gguf":
            if base_format == "gguf" and loaded.target != "gguf":
                raise PlanError(f"--base-format gguf takes a gguf plan, got target {loaded.target!r}", path=src)
            return GgufPlanLayout(loaded, src)
        return Bnb4PlanLayout(loaded, src)
    if base_format == "gguf":
        raise InputError("--base-format gguf needs --plan (a gguf plan from 'quantforge plan'), or pass a GGUF file "
                         "with --base-gguf")
    fmt = None if base_format in (None, "16bit") else base_format
    return UniformLayout(fmt, double_quant)


def _projection_names(arch: ArchConfig) -> list[str]:
    return [f"model.layers.{i}.{sub}.{p}" for i in range(arch.num_layers) for p, sub in PROJECTIONS.items()]


def _get(src: ModelSource, name: str, layout: BaseLayout, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if name not in src.tensors:
        raise CorruptCheckpoint(f"the checkpoint has no tensor {name!r}", path=src.path)
    return layout.tensor(name, src, device, dtype)


def _layer(src: ModelSource, arch: ArchConfig, i: int, layout: BaseLayout, lora: LoraSpec | None,
           device: torch.device, dtype: torch.dtype) -> DecoderLayer:
    pre = f"model.layers.{i}."
    proj = {}
    for p, sub in PROJECTIONS.items():
        name = f"{pre}{sub}.{p}"
        if f"{name}.weight" not in src.tensors:
            raise CorruptCheckpoint(f"the checkpoint has no tensor {name}.weight", path=src.path)
        base = layout.weight(f"{name}.weight", src, device, dtype)
        bias = _get(src, f"{name}.bias", layout, device, dtype) if f"{name}.bias" in src.tensors else None
        spec = lora if lora is not None and p in lora.targets else None
        proj[p] = LoraLinear(base, bias, spec)
    norm_names = ["input_layernorm", "post_attention_layernorm"]
    if arch.sandwich_norms:
        norm_names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    norms = {n: _get(src, f"{pre}{n}.weight", layout, device, dtype) for n in norm_names}
    if arch.qk_norm:
        norms.update({n: _get(src, f"{pre}self_attn.{n}.weight", layout, device, dtype)
                      for n in ("q_norm", "k_norm")})
    return DecoderLayer(arch, i, proj, norms)


def load_model(model: str | os.PathLike[str], *, lora: LoraSpec | None = None, base_format: str | None = "nf4",
               plan: str | os.PathLike[str] | Plan | None = None, double_quant: bool = True,
               base_gguf: str | os.PathLike[str] | None = None, layout: BaseLayout | None = None,
               device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, seed: int = 0,
               progress: Any = None, on_layer: Any = None) -> CausalLM:
    """Load ``model`` (a checkpoint folder or Hub id) with its projections in the base layout and LoRA attached.

    ``lora`` defaults to :class:`LoraSpec()` (r=16 on all seven projections); ``base_format`` is ``nf4``
    (double-quantized unless ``double_quant=False``), ``fp4``, a float format, or ``None`` for 16-bit LoRA;
    ``plan`` (a bnb4 plan file or :class:`~quantforge.plan.Plan`) overrides it; a gguf plan (with
    ``base_format="gguf"``) is applied in memory with the GGUF quantizers; ``base_gguf`` (a GGUF file of this model)
    supplies every base tensor from its bytes; ``layout`` overrides all of these.
    ``dtype`` is the compute dtype (bf16 on CUDA, fp32 on CPU by default). ``seed`` fixes the LoRA init.
    ``progress(items, total=, desc=, unit=)`` wraps the layer loop (a progress bar), if given.
    ``on_layer(layer)`` receives each decoder layer as soon as it is built and returns the module to keep (FSDP2
    shards it there: :func:`~.fsdp.layer_sharder`), if given.
    """
    src = ModelSource.open(model)
    arch = arch_from_config(src.config)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    layout = layout or make_layout(base_format, plan, double_quant, base_gguf)
    if isinstance(layout, Bnb4PlanLayout):
        layout.check(_projection_names(arch) + ["lm_head", "model.embed_tokens"])
    if isinstance(layout, (GgufPlanLayout, GgufFileLayout)):
        layout.prepare(src)
    lora = LoraSpec() if lora is None else lora
    gen = torch.random.fork_rng(devices=[]) if dev.type == "cpu" else torch.random.fork_rng(devices=[dev])
    layers = []
    with gen:
        torch.manual_seed(seed)
        steps = range(arch.num_layers)
        for i in progress(steps, total=arch.num_layers, desc="load", unit="layer") if progress else steps:
            layer = _layer(src, arch, i, layout, lora, dev, dt)
            layers.append(on_layer(layer) if on_layer is not None else layer)
    embed = _get(src, "model.embed_tokens.weight", layout, dev, dt)
    norm = _get(src, "model.norm.weight", layout, dev, dt)
    tied = arch.tie_embeddings or "lm_head.weight" not in src.tensors
    lm_head = None if tied else _get(src, "lm_head.weight", layout, dev, dt)
    src.close()
    info = {"model": str(model), "path": str(src.path), "layout": layout.describe(), "lora": lora,
            "dtype": str(dt).removeprefix("torch.")}
    out = CausalLM(arch, embed, layers, norm, lm_head, info)
    out.requires_grad_(False)
    for m in out.lora_modules().values():
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    return out
