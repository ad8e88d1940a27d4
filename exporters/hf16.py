"""Clean sharded 16-bit checkpoints (bf16 or fp16): the plain ``save_pretrained`` layout, nothing quantized.

Every floating-point tensor is cast to the target dtype; ``quantization_config`` is removed from ``config.json``
(a 16-bit folder that still carries it is loaded as 4-bit by downstream tools), and ``dtype`` is set. A
bitsandbytes 4-bit source is dequantized (``code[q] * absmax``, as bitsandbytes does) on the way. The tokenizer
files, chat template and generation config are copied as they are.

:func:`~quantforge.exporters._shards.write_sharded` is the lower-level writer: the merge stage feeds it its own
``(name, tensor)`` stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UnsupportedFormat
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

_QS = ".quant_state.bitsandbytes__"


def bnb4_groups(src: ModelSource) -> dict[str, list[str]]:
    """Packed 4-bit weights of a bitsandbytes checkpoint: weight name -> names of its quant-state tensors."""
    groups: dict[str, list[str]] = {}
    for name in src.tensors:
        if _QS in name:
            weight = name.split(_QS)[0]
            groups[weight] = [n for n in src.tensors if n.startswith(weight + ".")]
    return groups


def _bnb4_state(src: ModelSource, weight: str, members: list[str]) -> Any:
    from ..kernels.nf4 import QuantState4bit

    return QuantState4bit.from_tensors({n[len(weight) + 1:]: src.get(n) for n in members})


def export_hf16(model: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str = "bf16",
                max_shard_size: int | str = "5GB", force: bool = False, progress: Progress | None = None) -> Path:
    """Write ``model`` as a sharded bf16/fp16 safetensors checkpoint folder at ``out`` and return ``out``.

    A NaN/Inf tensor is a :class:`~quantforge.errors.CorruptCheckpoint`; a value beyond the fp16 range with
    ``dtype="fp16"`` is an input error. Written atomically: on any error nothing is left at ``out``.
    """
    import torch

    progress = progress or identity_progress
    target = torch_dtype(dtype, (torch.bfloat16, torch.float16, torch.float32))  # fp32: merged LoRA models
    src = model if isinstance(model, ModelSource) else ModelSource.open(model)
    qcfg = src.config.get("quantization_config") or {}
    if qcfg.get("quant_method") not in (None, "bitsandbytes") or qcfg.get("load_in_8bit"):
        raise UnsupportedFormat(f"cannot dequantize a {qcfg.get('quant_method')} checkpoint "
                                f"({'8-bit' if qcfg.get('load_in_8bit') else 'unsupported method'})", path=src.path)
    dest = check_output(out, force)
    groups = bnb4_groups(src)
    members = {n for names in groups.values() for n in names}
    names = [n for n in src.tensor_names() if n not in members]
    states = {w: _bnb4_state(src, w, groups[w]) for w in groups}
    layout = []
    for name in names:
        if name in states:
            layout.append([TensorSpec(name, target, states[name].shape)])
            continue
        info = src.tensors[name]
        st = TORCH_DTYPES.get(info.dtype)
        if st is None:
            raise UnsupportedFormat(f"tensor {name!r} has dtype {info.dtype}, which quantforge cannot write",
                                    path=info.file)
        layout.append([TensorSpec(name, target if st.is_floating_point else st, info.shape)])

    def tensors() -> Iterator[tuple[str, Any]]:
        from ..kernels.nf4 import dequantize_4bit

        for name in progress(names, total=len(names), desc="hf16"):
            path = src.tensors[name].file
            t = src.get(name)
            src.close()  # unmap the source: resident memory stays near one tensor, not the whole checkpoint
            if name in states:
                t = dequantize_4bit(t, states[name], torch.float32)
            yield name, checked(name, t, target, path)

    config = {k: v for k, v in src.config.items() if k != "quantization_config"}
    config["dtype"] = str(target).removeprefix("torch.")
    if "torch_dtype" in config:
        config["torch_dtype"] = config["dtype"]
    with atomic_dir(dest, force) as tmp:
        write_sharded(tensors(), tmp, max_shard_size, layout=layout)
        write_json(tmp / "config.json", config)
        copy_side_files(src, tmp)
    return dest
