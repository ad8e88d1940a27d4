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
from . import distribution, schema
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
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score every artifact against ``reference``; returns a schema-valid results document (no ``gate``)."""
    log = log or (lambda _msg: None)
    if not artifacts:
        raise InputError("name at least one artifact to evaluate")
    names = [Path(a).name for a in artifacts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"artifact names must be unique (the gate matches by name); repeated: {', '.join(dupes)}")
    text, text_path = _read_text(settings.text)

    def progress(i: int, n: int) -> None:
        log(f"  chunk {i}/{n}")

    log(f"reference {reference}")
    ref = settings.open(reference)
    try:
        chunks = distribution.prepare_chunks(ref, text, settings.n_ctx, settings.n_chunks)
        ref_logits = distribution.ReferenceLogits(ref, chunks)
        ref_metrics = distribution.score(ref, chunks, ref_logits, on_chunk=progress, reuse_reference=True)
        task_metrics, task_info = _task_metrics(ref, settings, log)
        ref_entry = _entry(reference, ref, {**ref_metrics, **task_metrics}, True)
        entries = []
        for path in artifacts:
            log(f"artifact {path}")
            engine = settings.open(path)
            try:
                agree = distribution.tokenizer_agrees(ref, engine, text)
                dist = distribution.score(engine, chunks, ref_logits, llamacpp_base=settings.llamacpp_base,
                                          on_chunk=progress)
                tmetrics, tinfo = _task_metrics(engine, settings, log)
                task_info = task_info or tinfo
                entries.append(_entry(path, engine, {**dist, **tmetrics}, agree))
            finally:
                engine.close()
    finally:
        ref.close()
    results = {
        "schema_version": schema.SCHEMA_VERSION,
        "quantforge_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": settings.seed,
        "lm_eval_version": _lm_eval_version() if settings.tasks else None,
        "settings": {
            "n_ctx": settings.n_ctx, "n_chunks": len(chunks), "text": str(text_path), "text_name": text_path.name,
            "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "limit": settings.limit,
            "kld_base": "llama.cpp-u16" if settings.llamacpp_base else "exact", "device": settings.device,
            "task_source": settings.task_source, "gguf_engine": settings.engine or "llama.cpp",
            "llamacpp_flash_attn": bool(settings.engine_opts.get("flash_attn", True)),
        },
        "tasks": task_info,
        "reference": ref_entry,
        "artifacts": entries,
    }
    return schema.validate(schema.clean(results))
