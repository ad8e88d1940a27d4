"""``calibrate``: both calibration stages over a Hugging Face model, layer by layer, with a cache.

Stage 1 (:mod:`.imatrix_pass`): the calibration chunks go through layer 0 for all chunks, then layer 1, ...;
hooks on every linear of the current layer add the squared inputs to the imatrix (llama-imatrix semantics).
Stage 2 (:mod:`.profile`): per-tensor sensitivity on held-out chunks. Files land in one folder, keyed by model,
data and settings so a rerun reuses what is still valid; under torchrun the work is shared out (:mod:`.parallel`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import distributed
from ..errors import InputError, MissingFile
from . import store
from .imatrix_pass import collect_imatrix
from .profile import SENSITIVITY_VERSION, Profiler
from .refs import tensor_refs
from .runner import DecoderRunner
from .settings import CalibrationSettings, Progress, no_progress


@dataclass
class CalibrationResult:
    folder: Path
    imatrix_reused: bool
    sensitivity_reused: bool
    seconds: dict[str, float]


def calibrate(model: Any, data: list[Any], out: Any, settings: CalibrationSettings | None = None,
              device: str = "cpu", batch_size: int = 4, progress: Progress = no_progress,
              force: bool = False) -> CalibrationResult:
    """Write ``imatrix.gguf``, ``sensitivity.json``, ``sensitivity.png`` and ``manifest.json`` into ``out``,
    reusing what a previous run with the same model, data and settings left there."""
    from ..arch import arch_for
    from ..imatrix import load_imatrix, save_imatrix_gguf
    from ..io import check_output
    from ..model_source import ModelSource
    from .data import file_digest, load_chunks

    s = settings or CalibrationSettings()
    s.validate()
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise InputError("the calibration output must be a folder", path=folder)
    src = ModelSource.open(model)
    spec = arch_for(src.model_type)
    if not data:
        raise InputError("give at least one --data file")
    for p in data:
        if not Path(p).is_file():
            raise MissingFile("calibration data file not found", path=p)
    data_info = [{"path": str(Path(p)), "sha256": file_digest(p)} for p in data]
    mhash = store.model_hash(src)
    imatrix_key = store.digest({"model": mhash, "data": [d["sha256"] for d in data_info], **s.imatrix_part()})
    sens_key = store.digest({"imatrix": imatrix_key, **s.sensitivity_part()})
    sens_file, plot_file, key_name = store.sensitivity_files(s.rounding)
    # torchrun: every rank runs calibrate(); rank 0 owns the folder (decides, reads and writes), see .parallel
    group = distributed.current()

    def folder_state() -> tuple[bool, bool]:
        """(sensitivity cached, imatrix cached)."""
        manifest = store.read_manifest(folder) if folder.is_dir() else None
        if manifest is None and folder.is_dir() and any(folder.iterdir()) and not force:
            check_output(folder, force)
        if store.cached(folder, key_name, sens_key, (store.IMATRIX, sens_file, plot_file)):
            return True, True
        folder.mkdir(parents=True, exist_ok=True)
        return False, store.cached(folder, "imatrix_key", imatrix_key, (store.IMATRIX,))

    sensitivity_cached, imatrix_reused = group.on_main(folder_state)
    if sensitivity_cached:
        return CalibrationResult(folder, True, True, {})
    kept = group.on_main(lambda: _other_modes(folder, imatrix_key, key_name))

    import torch
    from transformers import AutoTokenizer

    from .runner import load_model

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(src.path)
    chunks = load_chunks(data, tokenizer, s.tokens, s.ctx, s.holdout_tokens)
    torch.manual_seed(s.seed)
    run_on = group.local_device(device)
    runner = DecoderRunner(load_model(src.path, device=run_on, n_params=sum(src.numel(n) for n in src.tensors)),
                           device=run_on)
    refs = tensor_refs(runner, spec, s.candidates)
    seconds["load"] = time.perf_counter() - t0
    if imatrix_reused:
        imatrix = group.on_main(lambda: load_imatrix(folder / store.IMATRIX))
    else:
        t0 = time.perf_counter()
        imatrix = collect_imatrix(runner, refs, chunks.calibration, s.ctx, [Path(p).name for p in data], batch_size,
                                  progress, group=group)
        if group.is_main:
            save_imatrix_gguf(imatrix, folder / store.IMATRIX)
        seconds["imatrix"] = time.perf_counter() - t0
    if group.is_main:
        store.write_manifest(folder, {"imatrix_key": imatrix_key, "model": {"path": str(src.path), "hash": mhash},
                                      "data": data_info, "settings": s.imatrix_part(), **kept})
    rounders = None
    if s.rounding != "rtn":
        t0 = time.perf_counter()
        rounders = _rounders(runner, refs, chunks.calibration, folder, mhash, [d["sha256"] for d in data_info], s,
                             batch_size, progress, group)
        seconds["hessians"] = time.perf_counter() - t0
    if group.distributed:
        from .parallel import ShardedProfiler

        prof: Profiler = ShardedProfiler(group, runner, refs, imatrix, chunks.holdout, s, progress)
    else:
        prof = Profiler(runner, refs, imatrix, chunks.holdout, s, progress)
    prof.rounders = rounders
    t0 = time.perf_counter()
    prof.forward_cache()
    prof.fisher_and_proxies()
    seconds["proxies"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairs = prof.measure_pairs()
    prof.measure(pairs)
    seconds["measure"] = time.perf_counter() - t0
    fit = prof.fit_and_predict()
    table = {"version": SENSITIVITY_VERSION, "model": {"path": str(src.path), "hash": mhash,
                                                       "model_type": src.model_type, "tied_embeddings": runner.tied},
             "settings": asdict(s), "holdout": {"chunks": len(chunks.holdout), "tokens": prof.n_tokens,
                                                "base_nll": round(prof.base_nll, 5)},
             "calibration": {"chunks": len(chunks.calibration), "tokens": len(chunks.calibration) * s.ctx},
             "device": str(runner.device), "n_measured": len(pairs), "fit": fit,
             "seconds": {k: round(v, 1) for k, v in seconds.items()}, "tensors": prof.table()}
    if group.is_main:
        store.write_json(folder / sens_file, table)
        from .plot import plot_sensitivity

        plot_sensitivity(table, folder / plot_file)
        files = list(dict.fromkeys([store.IMATRIX, *kept.get("files", []), sens_file, plot_file]))
        store.write_manifest(folder, {"imatrix_key": imatrix_key, **kept, key_name: sens_key,
                                      "model": {"path": str(src.path), "hash": mhash}, "data": data_info,
                                      "settings": asdict(s), "files": files})
    src.close()
    group.barrier()
    return CalibrationResult(folder, imatrix_reused, False, seconds)


def _other_modes(folder: Path, imatrix_key: str, key_name: str) -> dict[str, Any]:
    """The sensitivity keys (and files) of the other rounding modes in the folder's manifest, kept when they were
    made from the same imatrix, so calibrating under one mode leaves the other modes' tables cached."""
    m = store.read_manifest(folder) if folder.is_dir() else None
    if not m or m.get("imatrix_key") != imatrix_key:
        return {}
    keys = {k: v for k, v in m.items() if k.startswith("sensitivity_key") and k != key_name}
    files = [f for k in keys for f in store.sensitivity_files(k.removeprefix("sensitivity_key_") if "_key_" in k
                                                              else "rtn")[:2]]
    return {**keys, "files": files} if keys else {}


def _rounders(runner: DecoderRunner, refs: list[Any], chunks: list[list[int]], folder: Path, mhash: str,
              data_digests: list[str], s: CalibrationSettings, batch_size: int, progress: Progress,
              group: Any) -> Any:
    """The optimized rounding of the settings' mode for the sensitivity stage, from the folder's input second
    moments (collected here, from the calibration chunks, unless the folder holds them for this model, data and
    token budget)."""
    from ..rounding import ModeRounders
    from ..rounding.hessians import FILE, hessian_writer, read_key
    from .hessian_pass import collect_hessians, hessian_names, hessians_key

    path = folder / FILE
    key = hessians_key(mhash, data_digests, s)
    if group.is_main and read_key(path) != key:
        with hessian_writer(path, hessian_names(refs)) as w:
            w.finish(*collect_hessians(runner, refs, chunks, w.add_group, batch_size, progress), key)
    group.barrier()
    return ModeRounders(s.rounding, path)
