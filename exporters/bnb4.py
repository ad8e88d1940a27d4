"""bitsandbytes 4-bit checkpoints (``*-bnb-4bit``) written directly, streaming, on CPU or GPU.

The output is what ``AutoModelForCausalLM.from_pretrained(model, quantization_config=BitsAndBytesConfig(
load_in_4bit=True, ...), dtype=compute_dtype).save_pretrained(out)`` writes, byte for byte in every tensor, without
loading the model: each quantized Linear ``m`` gets ``m.weight`` (packed uint8 ``(n/2, 1)``), ``m.weight.absmax``,
``m.weight.quant_map``, with double quantization ``m.weight.nested_absmax`` and ``m.weight.nested_quant_map``,
and ``m.weight.quant_state.bitsandbytes__<nf4|fp4>``; every other float tensor is cast to the compute dtype.
``config.json`` carries the ``quantization_config`` transformers reads, with ``llm_int8_skip_modules`` listing
the output embedding (``lm_head``) and the plan's skipped modules, so the loader keeps exactly those as 16-bit
``nn.Linear``. Skip entries follow transformers' matching rule (a module-boundary prefix, a regex, or a suffix).

Which tensors are Linear weights is read from the model class itself, instantiated on the ``meta`` device.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, PlanError, UnsupportedArch, UnsupportedFormat
from ..formats import get_format
from ..io import atomic_dir, check_output
from ..model_source import ModelSource
from ._shards import (
    TORCH_DTYPES,
    Progress,
    TensorSpec,
    checked,
    copy_side_files,
    identity_progress,
    torch_dtype,
    write_json,
    write_sharded,
)

_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"
_QUANT_STATE_MAX = 512


def skip_matches(module: str, patterns: list[str]) -> bool:
    """transformers' rule (``should_convert_module``): a pattern matches from the start up to a module boundary,
    as a regex with the same boundary, or as a suffix."""
    return any(re.match(rf"(?:{p}){_BOUNDARY}", module) or module.endswith(p) for p in patterns)


@dataclass
class ModelModules:
    """Module names of the model class: all of them, the ``nn.Linear`` ones, the output embedding, and the
    patterns transformers always keeps unquantized (``_keep_in_fp32_modules``)."""

    all: list[str]
    linear: set[str]
    output: list[str]
    keep: list[str]


def model_modules(src: ModelSource) -> ModelModules:
    """Instantiate the model on the ``meta`` device (no memory, no weights) and list its modules."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(src.path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise UnsupportedArch(f"transformers cannot build model_type {src.model_type!r} ({exc})".replace("\n", " "),
                              path=src.path) from exc
    names = [n for n, _ in model.named_modules() if n]
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out_emb = model.get_output_embeddings()
    output = [n for n, m in model.named_modules() if out_emb is not None and m is out_emb]
    keep = sorted(set(model._keep_in_fp32_modules or ()) | set(model._keep_in_fp32_modules_strict or ()))
    return ModelModules(names, linear, output, keep)


def _resolve_plan(plan: Any) -> Any:
    if plan is None or not isinstance(plan, (str, os.PathLike)):
        return plan
    from ..plan import load_plan

    return load_plan(plan, target="bnb4")


def skip_list(plan: Any, modules: ModelModules) -> list[str]:
    """``llm_int8_skip_modules``: the output embedding plus the plan's entries, each checked against the model."""
    wanted = list(plan.skip_modules) if plan is not None else []
    for entry in wanted:
        try:
            hit = any(skip_matches(m, [entry]) for m in modules.all)
        except re.error as exc:
            raise PlanError(f"skip_modules entry {entry!r} is not a valid module name or pattern ({exc})") from exc
        if not hit:
            example = sorted(modules.linear)[0] if modules.linear else "lm_head"
            raise PlanError(f"skip_modules names {entry!r}, but the model has no such module "
                            f"(names look like {example!r})")
    return sorted(set(["lm_head", *modules.output, *wanted]))


def export_bnb4(model: str | os.PathLike[str], out: str | os.PathLike[str], quant_type: str | None = None,
                double_quant: bool | None = None, compute_dtype: str = "bf16", plan: Any = None,
                max_shard_size: int | str = "5GB", force: bool = False, progress: Progress | None = None,
                device: str | None = None) -> Path:
    """Write a bitsandbytes 4-bit checkpoint folder of ``model`` to ``out`` and return ``out``.

    ``quant_type`` (nf4|fp4) and ``double_quant`` default to the plan's values, then to nf4 / False; ``plan`` is a
    plan file path or a :class:`~quantforge.plan.Plan` with ``target: bnb4``. ``device``: where to quantize
    (default: CUDA with the Triton kernel when available, else the CPU reference; the bytes are the same).
    Written atomically: on any error nothing is left at ``out``.
    """
    import torch

    progress = progress or identity_progress
    src = model if isinstance(model, ModelSource) else ModelSource.open(model)
    if (src.config.get("quantization_config") or {}).get("quant_method"):
        raise InputError("the checkpoint is already quantized; pass the 16/32-bit original", path=src.path)
    plan = _resolve_plan(plan)
    if plan is not None and plan.target != "bnb4":
        raise PlanError(f"the plan targets {plan.target!r}; bnb4 export needs a plan with target: bnb4")
    quant_type = quant_type or (plan.quant_type if plan is not None else "nf4")
    if quant_type not in ("nf4", "fp4"):
        raise UnsupportedFormat(f"unknown 4-bit quant type {quant_type!r}; expected nf4 or fp4")
    if double_quant is None:
        double_quant = bool(plan.double_quant) if plan is not None else False
    dtype = torch_dtype(compute_dtype, (torch.bfloat16, torch.float16, torch.float32))
    dest = check_output(out, force)
    modules = model_modules(src)
    skip = skip_list(plan, modules)
    quantized = {n for n, info in src.tensors.items() if n.endswith(".weight") and len(info.shape) == 2
                 and n[:-7] in modules.linear and not skip_matches(n[:-7], skip + modules.keep)}
    layout = [_specs(src, n, n in quantized, dtype, double_quant, quant_type) for n in src.tensor_names()]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def tensors() -> Iterator[tuple[str, Any]]:
        for name in progress(src.tensor_names(), total=len(src.tensors), desc="bnb4"):
            t = src.get(name).to(device)
            src.close()  # unmap the source: resident memory stays near one tensor, not the whole checkpoint
            t = checked(name, t, dtype, src.tensors[name].file)
            if name not in quantized:
                yield name, t
                continue
            packed, state = _quantize(t, quant_type, double_quant)
            yield name, packed
            for suffix, value in state.tensors().items():
                yield f"{name}.{suffix}", value

    config = dict(src.config)
    config["quantization_config"] = quantization_config(quant_type, double_quant, dtype, skip)
    _set_dtype(config, dtype)
    with atomic_dir(dest, force) as tmp:
        write_sharded(tensors(), tmp, max_shard_size, layout=layout)
        write_json(tmp / "config.json", config)
        copy_side_files(src, tmp)
    return dest


def _quantize(weight: Any, quant_type: str, double_quant: bool) -> Any:
    from ..kernels import nf4
    from ..kernels._triton import triton_available

    if weight.device.type == "cuda" and triton_available():
        return nf4.quantize_4bit_triton(weight, quant_type, double_quant)
    return nf4.quantize_4bit(weight, quant_type, double_quant)


def _specs(src: ModelSource, name: str, quantize: bool, dtype: Any, double_quant: bool, quant_type: str
           ) -> list[TensorSpec]:
    import torch

    info = src.tensors[name]
    st_dtype = TORCH_DTYPES.get(info.dtype)
    if st_dtype is None:
        raise UnsupportedFormat(f"tensor {name!r} has dtype {info.dtype}, which quantforge cannot write",
                                path=info.file)
    if not quantize:
        return [TensorSpec(name, dtype if st_dtype.is_floating_point else st_dtype, info.shape)]
    n = src.numel(name)
    fmt = get_format(quant_type)
    blocks = -(-n // fmt.block_size)
    specs = [TensorSpec(name, torch.uint8, ((n + 1) // 2, 1)),
             TensorSpec(f"{name}.absmax", torch.uint8 if double_quant else torch.float32, (blocks,)),
             TensorSpec(f"{name}.quant_map", torch.float32, (16,))]
    if double_quant:
        specs += [TensorSpec(f"{name}.nested_absmax", torch.float32, (-(-blocks // fmt.nested_block),)),
                  TensorSpec(f"{name}.nested_quant_map", torch.float32, (256,))]
    specs.append(TensorSpec(f"{name}.quant_state.bitsandbytes__{quant_type}", torch.uint8, None, _QUANT_STATE_MAX))
    return specs


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _set_dtype(config: dict[str, Any], dtype: Any) -> None:
    config["dtype"] = _dtype_name(dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = _dtype_name(dtype)


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: Any, skip: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` block, with the keys and defaults ``BitsAndBytesConfig.to_dict()`` writes."""
    return {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": _dtype_name(compute_dtype),
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant), "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": list(skip), "llm_int8_threshold": 6.0,
        "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }
