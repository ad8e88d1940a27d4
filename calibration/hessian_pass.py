"""The inputs' second moments ``XᵀX`` per linear input, layer by layer over the calibration chunks, for
error-feedback rounding (``quantforge quantize --optimize gptq``); saved as ``hessians.safetensors`` beside the
imatrix and reused while the model, data and token budget are unchanged.

Weights fed the very same input tensor (q/k/v, gate/up) are detected from the hooks (the same storage, shape
and strides reach them one after another; the previous input is held, so its memory cannot be reused in
between) and share one matrix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError, InternalError, MissingFile
from ..rounding.hessians import FILE, hessian_writer, read_key
from . import store
from .hooks import capture_inputs, linear_modules
from .refs import Contexts, TensorRef, batches
from .runner import DecoderRunner
from .settings import CalibrationSettings, Progress, no_progress

HESSIAN_VERSION = 1


class HessianAccumulator:
    """Running ``Σ xᵀx`` (float64, on the inputs' device) and token counts per input group, fed one matmul input
    at a time; :meth:`finish` turns the open sums into packed float32 ``H`` on the host (after each layer, so the
    float64 sums of one layer at a time are held) and hands each to ``sink(group, H)`` when one is given (the file
    writer: nothing is kept), else keeps it for :meth:`result`.

    ``names`` maps a hook key to the GGUF weight name. A weight whose input is the same tensor object as the
    previous weight's (same storage, shape and strides) joins that weight's group; it must do so on every call."""

    def __init__(self, names: dict[str, str], sink: Callable[[str, Any], None] | None = None) -> None:
        self.names = names
        self.sink = sink
        self.members: dict[str, str] = {}
        self.sums: dict[str, Any] = {}
        self.done: dict[str, Any] = {}
        self.tokens: dict[str, int] = {}
        self._last: tuple[str, Any] | None = None

    def add(self, key: str, x: Any) -> None:
        import torch

        name = self.names[key]
        last = self._last[1] if self._last is not None else None
        same = last is not None and (x.data_ptr(), x.shape, x.stride()) == (last.data_ptr(), last.shape, last.stride())
        if name in self.members and self.members[name] != name:
            if not (same and self._last[0] == self.members[name]):
                raise InternalError(f"{name} shared its input with {self.members[name]} once but not on a later "
                                    "call; this architecture needs separate input statistics")
            return
        if same and name not in self.members:
            self.members[name] = self._last[0]
            return
        self.members[name] = name
        rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
        gram = (rows.t() @ rows).to(torch.float64)
        self.sums[name] = gram if name not in self.sums else self.sums[name].add_(gram)
        self.tokens[name] = self.tokens.get(name, 0) + rows.shape[0]
        self._last = (name, x)

    def finish(self) -> None:
        """Close every open group: ``H = Σxᵀx / tokens`` as float32, upper triangle packed, on the host."""
        from ..rounding.hessians import pack_upper

        for g in list(self.sums):
            packed = pack_upper(self.sums.pop(g) / max(1, self.tokens[g]))
            if self.sink is None:
                self.done[g] = packed
            else:
                self.sink(g, packed)
        self._last = None

    def result(self) -> tuple[dict[str, Any], dict[str, str], dict[str, int]]:
        """``({group: packed H (float32)}, {weight: group}, {group: tokens})``."""
        self.finish()
        return dict(self.done), dict(self.members), dict(self.tokens)


def hessian_names(refs: list[TensorRef]) -> list[str]:
    """The GGUF names of the weights whose inputs :func:`collect_hessians` measures (the decoder layers' linears)."""
    return [r.gguf_name for r in refs if r.layer is not None]


def collect_hessians(runner: DecoderRunner, refs: list[TensorRef], chunks: list[list[int]],
                     sink: Callable[[str, Any], None], batch_size: int = 4, progress: Progress = no_progress
                     ) -> tuple[dict[str, str], dict[str, int]]:
    """Run the chunks through the decoder layer by layer with hooks on every linear weight of ``refs``; each
    group's packed ``H`` goes to ``sink(group, H)`` once its layer is done. Returns ``({weight: group}, {group:
    tokens})``."""
    import torch

    names = {id(r.module): r.gguf_name for r in refs if r.layer is not None}
    acc = HessianAccumulator({n: n for n in names.values()}, sink)
    keep = runner.device if runner.resident else torch.device("cpu")
    ctxs = Contexts(runner)
    with torch.no_grad():
        hs = [runner.embed(b).to(keep) for b in batches(chunks, batch_size)]
        for i in progress(range(runner.n_layers), total=runner.n_layers, desc="XᵀX", unit="layer"):
            mods = {names[id(m)]: m for m in linear_modules(runner.layers[i]).values() if id(m) in names}
            with runner.on_device(i), capture_inputs(mods, acc.add):
                for b, h in enumerate(hs):
                    h = h.to(runner.device)
                    hs[b] = runner.layer(i, h, ctxs(h)).to(keep)
            acc.finish()
    _, members, tokens = acc.result()
    return members, tokens


def hessians_key(model_hash: str, data_digests: list[str], settings: CalibrationSettings) -> str:
    return store.digest({"model": model_hash, "data": data_digests, **settings.imatrix_part(),
                         "hessians": HESSIAN_VERSION})


def calibrate_hessians(model: Any, data: list[Any], out: Any, settings: CalibrationSettings | None = None,
                       device: str = "cpu", batch_size: int = 4, progress: Progress = no_progress) -> dict[str, Any]:
    """Write ``out/hessians.safetensors`` from the same calibration chunks the imatrix uses (same data, token budget
    and context), unless the file there was made from the same model, data and settings. Returns
    ``{"path", "reused", "seconds"}``."""
    from ..arch import arch_for
    from ..model_source import ModelSource
    from .data import file_digest, load_chunks

    s = settings or CalibrationSettings()
    s.validate()
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise InputError("the calibration output must be a folder", path=folder)
    if not data:
        raise InputError("give at least one --data file")
    for p in data:
        if not Path(p).is_file():
            raise MissingFile("calibration data file not found", path=p)
    src = ModelSource.open(model)
    try:
        spec = arch_for(src.model_type)
        key = hessians_key(store.model_hash(src), [file_digest(p) for p in data], s)
        path = folder / FILE
        if read_key(path) == key:
            return {"path": path, "reused": True, "seconds": 0.0}
        import torch
        from transformers import AutoTokenizer

        from .refs import tensor_refs
        from .runner import load_model

        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(src.path)
        chunks = load_chunks(data, tokenizer, s.tokens, s.ctx, s.holdout_tokens)
        torch.manual_seed(s.seed)
        runner = DecoderRunner(load_model(src.path, device=device, n_params=sum(src.numel(n) for n in src.tensors)),
                               device=device)
        refs = tensor_refs(runner, spec, s.candidates)
        folder.mkdir(parents=True, exist_ok=True)
        with hessian_writer(path, hessian_names(refs)) as w:
            members, tokens = collect_hessians(runner, refs, chunks.calibration, w.add_group, batch_size, progress)
            w.finish(members, tokens, key)
        return {"path": path, "reused": False, "seconds": time.perf_counter() - t0}
    finally:
        src.close()
