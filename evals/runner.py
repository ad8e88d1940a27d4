"""``quantforge eval`` orchestration: reference once, then each artifact in turn, into one results document.

The reference engine stays open; each artifact is opened, scored (PPL/KLD/top-1 on the text, then lm-eval tasks)
and closed before the next, so at most two models are in memory. Nothing is patched globally. Status lines go
to the ``log`` callback (the CLI prints them); this module prints nothing.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import InputError
from . import cache, distribution, schema
from .artifacts import describe_artifact
from .data import wikitext2_test
from .engines import Engine, HFEngine, open_engine

DEFAULT_SEED = 1234


@dataclass
class EvalSettings:
    """What to measure and how. ``engine`` picks the GGUF engine (llama.cpp or torch) for GGUF artifacts."""

    tasks: Sequence[str] = ()
    limit: int | None = None
    n_ctx: int = 512
    n_chunks: int | None = None
    text: str | None = None
    seed: int = DEFAULT_SEED
    engine: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    n_threads: int | None = None
    batch_size: int = 1
    task_source: str = "auto"
    llamacpp_base: bool = False
    engine_opts: dict[str, Any] = field(default_factory=dict)

    def open(self, path: str | Path) -> Engine:
        """Open an artifact with these settings (llama.cpp context sized for tasks and chunks)."""
        opts = {"device": self.device, "dtype": self.dtype, "n_threads": self.n_threads,
                "batch_size": self.batch_size, "n_ctx": max(2048, self.n_ctx), **self.engine_opts}
        return open_engine(path, engine=self.engine, **opts)


def _entry(path: str | Path, engine: Engine, metrics: dict[str, Any], tokenizer_match: bool) -> dict[str, Any]:
    n_weights = engine.n_weights() if isinstance(engine, HFEngine) and _is_bnb(path) else None
    info = describe_artifact(path, n_weights=n_weights)
    info.update({"engine": engine.kind, "tokenizer_match": tokenizer_match, "metrics": metrics})
    return info


def _is_bnb(path: str | Path) -> bool:
    from .engines import artifact_kind

    return artifact_kind(path) == "bnb4"


def _read_text(path: str | None) -> tuple[str, Path]:
    p = Path(path) if path else wikitext2_test()
    if not p.is_file():
        raise InputError("no such text file for perplexity/KLD", path=p)
    return p.read_text(encoding="utf-8"), p


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def _task_metrics(engine: Engine, settings: EvalSettings, log: Callable[[str], None]) -> tuple[dict, dict]:
    if not settings.tasks:
        return {}, {}
    try:
        from .lm_backends import from_engine
        from .lm_eval_runner import run_tasks
    except ImportError as exc:
        raise InputError("--tasks needs lm-eval (pip install 'quantforge[eval]')") from exc
    log(f"  tasks {', '.join(settings.tasks)} (limit {settings.limit})")
    res = run_tasks(from_engine(engine), settings.tasks, limit=settings.limit, seed=settings.seed,
                    source=settings.task_source)
    return res.metrics, res.tasks


def evaluate(artifacts: Sequence[str | Path], reference: str | Path, settings: EvalSettings,
             log: Callable[[str], None] | None = None, use_cache: bool = True) -> dict[str, Any]:
    """Score every artifact against ``reference``; returns a schema-valid results document (no ``gate``).

    With ``use_cache`` the reference's scored logits and task results are read from (or written to) the
    on-disk cache of :mod:`.cache`, so a second run against the same reference, text and settings never loads
    the reference model. Cached and fresh numbers are identical."""
    log = log or (lambda _msg: None)
    if not artifacts:
        raise InputError("name at least one artifact to evaluate")
    names = [Path(a).name for a in artifacts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"artifact names must be unique (the gate matches by name); repeated: {', '.join(dupes)}")
    text, text_path = _read_text(settings.text)
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()

    def progress(i: int, n: int) -> None:
        log(f"  chunk {i}/{n}")

    side = _ReferenceSide(reference, settings, log, use_cache)
    try:
        ref_logits, ref_metrics, probe, ref_info = side.distribution(text, text_sha, progress)
        chunks = ref_logits.chunks
        task_metrics, task_info = side.tasks()
        ref_entry = {**ref_info, "metrics": {**ref_metrics, **task_metrics}}
        if side.fresh_logits is None:
            side.release()
        entries = []
        for path in artifacts:
            log(f"artifact {path}")
            engine = settings.open(path)
            try:
                agree = distribution.tokenizer_probe(engine, text) == probe
                dist = distribution.score(engine, chunks, ref_logits, llamacpp_base=settings.llamacpp_base,
                                          on_chunk=progress)
                tmetrics, tinfo = _task_metrics(engine, settings, log)
                task_info = task_info or tinfo
                entries.append(_entry(path, engine, {**dist, **tmetrics}, agree))
            finally:
                engine.close()
    finally:
        side.release()
    results = {
        "schema_version": schema.SCHEMA_VERSION,
        "quantforge_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": settings.seed,
        "lm_eval_version": _lm_eval_version() if settings.tasks else None,
        "settings": {
            "n_ctx": settings.n_ctx, "n_chunks": len(chunks), "text": str(text_path), "text_name": text_path.name,
            "text_sha256": text_sha, "limit": settings.limit,
            "kld_base": "llama.cpp-u16" if settings.llamacpp_base else "exact", "device": settings.device,
            "task_source": settings.task_source, "gguf_engine": settings.engine or "llama.cpp",
            "llamacpp_flash_attn": bool(settings.engine_opts.get("flash_attn", True)),
            "reference_from_cache": side.from_cache,
        },
        "tasks": task_info,
        "reference": ref_entry,
        "artifacts": entries,
    }
    return schema.validate(schema.clean(results))


class _ReferenceSide:
    """The reference's logits, metrics and task results: from the cache when present, else computed (the model
    opened on first need and closed by :meth:`release` before the artifacts run) and then cached."""

    def __init__(self, reference: str | Path, settings: EvalSettings, log: Callable[[str], None],
                 use_cache: bool) -> None:
        self.reference = reference
        self.settings = settings
        self.log = log
        self.use_cache = use_cache
        self.engine: Engine | None = None
        self.fresh_logits: distribution.ReferenceLogits | None = None
        self.from_cache = False
        s = settings
        self.engine_key = {"engine": s.engine, "dtype": s.dtype, "device": s.device,
                           "flash_attn": s.engine_opts.get("flash_attn", True), "batch_size": s.batch_size}

    def open(self) -> Engine:
        if self.engine is None:
            self.log(f"reference {self.reference}")
            self.engine = self.settings.open(self.reference)
        return self.engine

    def release(self) -> None:
        """Close the reference model. Before the artifacts run this is done only when its scored logits are all
        in memory (``fresh_logits`` is ``None``); otherwise they are recomputed per chunk and the model stays."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def distribution(self, text: str, text_sha: str,
                     progress: Callable[[int, int], None]) -> tuple[Any, dict[str, Any], list[int], dict[str, Any]]:
        """``(logits, metrics, tokenizer probe, artifact entry without metrics)`` of the reference."""
        s = self.settings
        key = (cache.reference_key(self.reference, self.engine_key, text_sha, s.n_ctx, s.n_chunks)
               if self.use_cache else None)
        hit = cache.load_reference(key) if key else None
        if hit is not None:
            self.from_cache = True
            self.log(f"reference {self.reference}: {len(hit)} chunks of logits from the cache ({hit.folder})")
            return hit, hit.meta["metrics"], hit.meta["probe"], hit.meta["entry"]
        ref = self.open()
        chunks = distribution.prepare_chunks(ref, text, s.n_ctx, s.n_chunks)
        logits = distribution.ReferenceLogits(ref, chunks)
        metrics = distribution.score(ref, chunks, logits, on_chunk=progress, reuse_reference=True)
        probe = distribution.tokenizer_probe(ref, text)
        entry = {k: v for k, v in _entry(self.reference, ref, {}, True).items() if k != "metrics"}
        if key and logits.complete():
            meta = {"chunks": chunks, "metrics": metrics, "probe": probe, "entry": entry}
            cache.save_reference(key, meta, logits)
        if not logits.complete():
            self.fresh_logits = logits
            return logits, metrics, probe, entry
        return _Held(logits), metrics, probe, entry

    def tasks(self) -> tuple[dict[str, Any], dict[str, Any]]:
        s = self.settings
        if not s.tasks:
            return {}, {}
        key = (cache.tasks_key(self.reference, self.engine_key, list(s.tasks), s.limit, s.seed, s.task_source,
                               _lm_eval_version()) if self.use_cache else None)
        hit = cache.load_tasks(key) if key else None
        if hit is not None:
            self.log(f"reference {self.reference}: task results from the cache")
            return hit["metrics"], hit["tasks"]
        metrics, info = _task_metrics(self.open(), s, self.log)
        if key:
            cache.save_tasks(key, metrics, info)
        return metrics, info


class _Held:
    """Reference logits that are all in memory: indexable like :class:`~.distribution.ReferenceLogits` but holding
    no model (so the reference engine can be closed before the artifacts are opened)."""

    def __init__(self, logits: distribution.ReferenceLogits) -> None:
        self.chunks = logits.chunks
        self._items = [logits[i] for i in range(len(logits.chunks))]

    def __getitem__(self, i: int) -> Any:
        return self._items[i]
