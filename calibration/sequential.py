"""Sequential statistics for error-feedback rounding: the inputs the *quantized* model feeds each linear, and the
correction that makes its rounding target compensate for the error the layers before it left.

A linear with float weight ``W`` sees ``x_f`` in the float model and ``x_q`` once every earlier weight is
quantized. The rounding that keeps its output closest to the float model's minimizes ``Σ ‖W x_f − Ŵ x_q‖²`` over
the calibration tokens. With ``H = E[x_q x_qᵀ]`` and ``C = E[x_f x_qᵀ]`` that equals ``‖(W' − Ŵ) x_q‖²`` plus a
constant, for the target ``W' = W + W D``, ``D = (C − H)(H + δI)⁻¹`` (ridge ``δ`` = :data:`DAMP` · mean diag
``H``, pulling ``W'`` towards ``W``; ``D = 0`` when the inputs agree). So the ordinary rounders
(:mod:`quantforge.rounding`) fitted to ``H`` and given ``W'`` do the compensated rounding, and the exporter only
needs ``H`` and ``D`` per input group.

Both are measured walking the decoder layer by layer with two activation streams over the calibration chunks: the
float model's and the quantized model's. Inside a layer the input groups (q/k/v, o, gate/up, down) are visited
in the order the layer calls them; each group's weights are rounded (the type and mode they will be written
with, the calibration's imatrix) before the next group's inputs are read, so every ``x_q`` comes from weights
that are already quantized; the quantized stream starts from the token embedding as the file holds it. On
dithered SmolLM2 at q4_k_m, gptq on these statistics gives a KL divergence 53% below llama.cpp's imatrix mix,
where gptq on the float model's ``XᵀX`` gives 24%, and 57% for the dynamic plan of the same size
(``benchmarks/rounding_quality.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError, InternalError, MissingFile
from . import store
from .candidates import fake_quantize
from .hooks import linear_modules, swapped_weight
from .refs import Contexts, batches
from .runner import DecoderRunner
from .settings import CalibrationSettings, Progress, no_progress

FILE = "sequential.safetensors"
SEQUENTIAL_VERSION = 1
DAMP = 0.1
"""Ridge of the correction, as a fraction of ``H``'s mean diagonal. On dithered SmolLM2 with gptq, 0.1 measured KL
divergences 53.4% (uniform q4_k_m) and 57.0% (the q4_k_m-sized dynamic plan) below llama.cpp's imatrix q4_k_m where
0.01 measured 50.0% and 54.5%; towards 0 the correction overfits the calibration tokens (3x llama.cpp's KL
divergence)."""


def correction(c: Any, h: Any, damp: float = DAMP) -> Any:
    """``D = (C − H)(H + δI)⁻¹`` (float64 ``(n, n)``) from ``C = E[x_f x_qᵀ]`` and ``H = E[x_q x_qᵀ]``."""
    import torch

    c, h = c.to(torch.float64), h.to(torch.float64)
    delta = damp * float(torch.diagonal(h).clamp(min=0).mean())
    if not delta > 0:
        return torch.zeros_like(h)
    damped = h.clone()
    damped.diagonal().add_(delta)
    L, info = torch.linalg.cholesky_ex(damped)
    del damped
    if int(info) != 0:
        raise InputError("the quantized inputs' second-moment matrix is not positive semi-definite; recalibrate")
    # H + δI is symmetric: D = (C − H) A⁻¹ is the transpose of A⁻¹ (C − H)ᵀ
    return torch.cholesky_solve((c - h).t().contiguous(), L).t()


class _Captured(Exception):
    """Raised by a pre-hook once the wanted input is seen, ending the layer's forward there."""

    def __init__(self, x: Any) -> None:
        super().__init__()
        self.x = x


def _input_of(runner: DecoderRunner, i: int, h: Any, ctx: Any, module: Any) -> Any:
    """The input ``module`` of layer ``i`` receives when the layer runs on ``h`` (the forward stops there)."""

    def hook(_mod: Any, args: tuple[Any, ...]) -> None:
        raise _Captured(args[0].detach())

    handle = module.register_forward_pre_hook(hook)
    try:
        runner.layer(i, h, ctx)
    except _Captured as c:
        return c.x
    finally:
        handle.remove()
    raise InternalError("the decoder layer finished without calling one of its linear weights")


def _float_inputs(runner: DecoderRunner, i: int, hs: list[Any], ctxs: Contexts, mods: dict[str, Any]
                  ) -> tuple[list[list[str]], dict[str, list[Any]]]:
    """Run layer ``i`` on every batch of ``hs`` (replaced by the outputs), recording each linear's input.

    Returns the input groups in call order (weights fed the very same tensor share one, as in
    :class:`~.hessian_pass.HessianAccumulator`) and each group's inputs per batch, keyed by its first weight."""
    by_id = {id(m): name for name, m in mods.items()}
    groups: list[list[str]] = []
    inputs: dict[str, list[Any]] = {}
    state: dict[str, Any] = {"last": None, "first": True}

    def hook(mod: Any, args: tuple[Any, ...]) -> None:
        name, x = by_id[id(mod)], args[0].detach()
        last = state["last"]
        same = last is not None and (x.data_ptr(), x.shape, x.stride()) == (
            last.data_ptr(), last.shape, last.stride())
        if state["first"]:
            if same:
                groups[-1].append(name)
            else:
                groups.append([name])
                inputs[name] = []
        if not same:
            if name not in inputs:
                raise InternalError(f"{name}: the layer's input sharing changed between batches")
            inputs[name].append(x.clone())
        state["last"] = x

    handles = [m.register_forward_pre_hook(hook) for m in mods.values()]
    try:
        for b, h in enumerate(hs):
            state["last"] = None
            hs[b] = runner.layer(i, h, ctxs(h))
            state["first"] = False
    finally:
        for hd in handles:
            hd.remove()
    if sorted(n for g in groups for n in g) != sorted(mods):
        raise InternalError(f"layer {i}: some linear weights never ran")
    return groups, inputs


def collect_sequential(runner: DecoderRunner, names: dict[int, str], chunks: list[list[int]],
                       rounding: Callable[[str, Any, Any, str, int], Any], sink: Callable[[str, Any, Any], None],
                       batch_size: int = 4, damp: float = DAMP, embedding: Any = None,
                       progress: Progress = no_progress) -> dict[str, Any]:
    """Walk the decoder with a float and a quantized stream (the quantized one starts from ``embedding``, the
    token embedding as the file will hold it, when given).

    ``names`` maps ``id(module)`` to the GGUF name of every linear to quantize. For each input group, in call
    order: ``H`` and ``C`` from both streams' inputs (float64 sums), ``D`` (:func:`correction`, rounded to
    float16 as saved) go to ``sink(group, H, D)`` (the file writer), then each weight's target ``W + W D``
    (float32) goes to ``rounding(name, target, H, group, tokens)``, which returns the quantized weight (dequantized,
    HF orientation) that the quantized stream uses from then on. The model's weights are restored afterwards.
    Returns ``{"members": {name: group}, "tokens": {group: T}, "drift": [relative error of the quantized stream
    after each layer]}``."""
    import torch

    from ..rounding.hessians import pack_upper, unpack_upper

    ctxs = Contexts(runner)
    keep = runner.device if runner.resident else torch.device("cpu")
    out: dict[str, Any] = {"members": {}, "tokens": {}, "drift": []}
    originals: list[tuple[Any, Any]] = []
    try:
        with torch.no_grad():
            hs_f = [runner.embed(b).to(keep) for b in batches(chunks, batch_size)]
            if embedding is None:
                hs_q = [h.clone() for h in hs_f]
            else:
                with swapped_weight(runner.decoder.embed_tokens, embedding):
                    hs_q = [runner.embed(b).to(keep) for b in batches(chunks, batch_size)]
            for i in progress(range(runner.n_layers), total=runner.n_layers, desc="sequential", unit="layer"):
                mods = {names[id(m)]: m for m in linear_modules(runner.layers[i]).values() if id(m) in names}
                with runner.on_device(i):
                    hs_f = [h.to(runner.device) for h in hs_f]
                    groups, x_f = _float_inputs(runner, i, hs_f, ctxs, mods)
                    for g in groups:
                        head = g[0]
                        n = mods[head].weight.shape[1]
                        H = torch.zeros(n, n, dtype=torch.float64, device=runner.device)
                        C = torch.zeros_like(H)
                        T = 0
                        for b, h in enumerate(hs_q):
                            h = h.to(runner.device)
                            xq = _input_of(runner, i, h, ctxs(h), mods[head]).reshape(-1, n).to(torch.float32)
                            xf = x_f[head][b].reshape(-1, n).to(torch.float32)
                            H += (xq.t() @ xq).to(torch.float64)
                            C += (xf.t() @ xq).to(torch.float64)
                            T += xq.shape[0]
                        del x_f[head]
                        H /= T
                        C /= T
                        packed = pack_upper(H)
                        h32 = unpack_upper(packed).to(runner.device)  # what the saved file gives back
                        d32 = correction(C, H, damp).to(torch.float16).to(torch.float32)
                        sink(head, packed, d32)
                        del packed
                        out["tokens"][head] = T
                        for name in g:
                            mod = mods[name]
                            w = mod.weight.data
                            originals.append((mod, w))
                            w32 = w.to(torch.float32)
                            out["members"][name] = head
                            deq = rounding(name, torch.addmm(w32, w32, d32), h32, head, T)
                            mod.weight.data = deq.to(device=w.device, dtype=w.dtype)
                    hs_q = [runner.layer(i, h.to(runner.device), ctxs(h)).to(keep) for h in hs_q]
                    hs_f = [h.to(keep) for h in hs_f]
                num = sum(float(((q - f).double() ** 2).sum()) for q, f in zip(hs_q, hs_f, strict=True))
                den = sum(float((f.double() ** 2).sum()) for f in hs_f)
                out["drift"].append(num / max(den, 1e-30))
    finally:
        for mod, w in originals:
            mod.weight.data = w
    return out


class _Rounding:
    """The exporter's rounding of one weight, reproduced for the quantized stream: GGUF row order (Q/K
    permutation), the type and mode it will be written with, the imatrix vector where the type takes one."""

    def __init__(self, spec: Any, cfg: dict, hf_names: dict[str, str], types: dict[str, str], modes: dict[str, str],
                 imat: Any) -> None:
        from ..rounding import optimizable

        self.spec, self.cfg, self.hf, self.types, self.modes, self.imat = spec, cfg, hf_names, types, modes, imat
        self.optimized = {n for n, t in types.items() if modes.get(n) in ("gptq", "tune") and optimizable(t)}
        """The weights the exporter rounds with the mode (the others keep the type's default rounding)."""

    def __call__(self, name: str, target: Any, h: Any, group: str, tokens: int) -> Any:
        import torch

        from .. import arch as archmod
        from ..formats import get_format
        from ..rounding import make_rounder
        from ..rounding.gptq import FactorCache

        fmt = get_format(self.types[name])
        heads = archmod.qk_heads(self.spec, self.hf[name], self.cfg)
        rows = (archmod.permute_rows(target, heads) if heads else target).contiguous()
        im = self.imat.for_tensor(name) if self.imat is not None else None
        if name in self.optimized:
            im = None if im is None or not fmt.takes_imatrix else torch.as_tensor(im, dtype=torch.float32,
                                                                                  device=rows.device)
            rounder = make_rounder(fmt.name, self.modes[name], lambda: h, group, FactorCache(), tokens=tokens)
            deq = fmt.dequantize(rounder(rows, im)).reshape(rows.shape)
        else:
            deq = fake_quantize(rows, fmt.name, im)
        return archmod.unpermute_rows(deq, heads) if heads else deq


def _quantized_rows(weight: Any, fmt: str | None, rows: int = 4096) -> Any:
    """``weight`` through type ``fmt``'s default rounding and back (float32, row chunks), or ``None`` when the
    type is missing or a float type (the stream then starts from the float weight)."""
    import torch

    from ..formats import Family, get_format

    if fmt is None or get_format(fmt).family is Family.FLOAT:
        return None
    out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    for r0 in range(0, weight.shape[0], rows):
        out[r0:r0 + rows] = fake_quantize(weight[r0:r0 + rows], fmt)
    return out


def export_types(src: Any, spec: Any, qtype: str | None, plan: Any, has_imatrix: bool
                 ) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """``({gguf name: type}, {gguf name: plan's rounding mode}, {gguf name: hf name})`` of the GGUF that
    ``quantize --type qtype`` (or ``--plan plan``) writes."""
    from ..presets import get_mix
    from ..tensor_layout import typed_jobs

    plan_types, modes, mix = None, {}, qtype
    if plan is not None:
        from ..plan import load_plan

        loaded = load_plan(plan, target="gguf")
        plan_types, modes = loaded.gguf_types(), loaded.optimize_modes()
        mix = loaded.base_type or qtype
    if mix is None:
        raise InputError("give the GGUF type (a mix such as q4_k_m) or a plan the statistics are for")
    jobs = typed_jobs(src, spec, get_mix(mix).name, has_imatrix, plan_types)
    return {j.gguf_name: j.fmt for j in jobs}, modes, {j.gguf_name: j.hf_name for j in jobs if j.hf_name}


def calibrate_sequential(model: Any, data: list[Any], out: Any, settings: CalibrationSettings | None = None,
                         qtype: str | None = None, plan: Any = None, mode: str = "gptq", device: str = "cpu",
                         batch_size: int = 4, progress: Progress = no_progress) -> dict[str, Any]:
    """Write ``out/sequential.safetensors`` for the GGUF of mix ``qtype`` (or ``plan``, whose per-tensor modes
    win over ``mode``) with the calibration chunks the imatrix uses and ``out/imatrix.gguf`` (run ``calibrate``
    first), unless the file there was made from the same model, data, settings, types and modes. Returns
    ``{"path", "reused", "seconds", "drift"}``."""
    from ..arch import arch_for
    from ..arch_hparams import resolve_arch
    from ..imatrix import load_imatrix
    from ..model_source import ModelSource
    from ..rounding import MODES
    from ..rounding.hessians import hessian_writer, read_key
    from .data import file_digest, load_chunks

    s = settings or CalibrationSettings()
    s.validate()
    if mode not in MODES or mode == "rtn":
        raise InputError(f"the sequential statistics are for --optimize gptq or tune, not {mode!r}")
    folder = Path(out)
    imatrix = folder / store.IMATRIX
    if not imatrix.is_file():
        raise MissingFile("no imatrix in the calibration folder; run 'quantforge calibrate' into it first",
                          path=folder)
    src = ModelSource.open(model)
    try:
        spec = resolve_arch(src.model_type, src.text_config)
        types, plan_modes, hf_names = export_types(src, spec, qtype, plan, has_imatrix=True)
        modes = {name: plan_modes.get(name, mode) for name in types}
        key = store.digest({"model": store.model_hash(src), "data": [file_digest(p) for p in data],
                            **s.imatrix_part(), "imatrix": file_digest(imatrix), "types": types, "modes": modes,
                            "damp": DAMP, "sequential": SEQUENTIAL_VERSION})
        path = folder / FILE
        if read_key(path) == key:
            return {"path": path, "reused": True, "seconds": 0.0, "drift": []}
        import torch
        from transformers import AutoTokenizer

        from .refs import tensor_refs
        from .runner import load_model

        t0 = time.perf_counter()
        chunks = load_chunks(data, AutoTokenizer.from_pretrained(src.path), s.tokens, s.ctx, s.holdout_tokens)
        torch.manual_seed(s.seed)
        runner = DecoderRunner(load_model(src.path, device=device, n_params=sum(src.numel(n) for n in src.tensors)),
                               device=device)
        refs = tensor_refs(runner, arch_for(src.model_type), s.candidates)
        names = {id(r.module): r.gguf_name for r in refs if r.layer is not None and r.gguf_name in types}
        rounding = _Rounding(spec, dict(src.text_config), hf_names, types, modes, load_imatrix(imatrix))
        emb = _quantized_rows(runner.decoder.embed_tokens.weight, types.get("token_embd.weight"))
        with hessian_writer(path, names.values()) as w:
            res = collect_sequential(runner, names, chunks.calibration, rounding, w.add_group, batch_size, DAMP, emb,
                                     progress)
            rounded = {n: types[n] for n in res["members"] if n in rounding.optimized}
            w.finish(res["members"], res["tokens"], key, types=rounded, mode=mode)
        return {"path": path, "reused": False, "seconds": time.perf_counter() - t0, "drift": res["drift"]}
    finally:
        src.close()
