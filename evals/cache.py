"""On-disk cache of the reference side of an evaluation: its scored logits per chunk and its task results.

A second ``quantforge eval`` against the same reference, text and settings reads them back instead of loading
and running the reference model again. Entries live under ``$QUANTFORGE_CACHE/eval/`` (default
``~/.cache/quantforge/eval``), one folder per key, written atomically:

- ``ref-<key>/``: ``meta.json`` (chunks' token ids, the reference's metrics and artifact entry, its encoding of
  the text's start for the tokenizer check) and ``logits-<i>.npy`` (float32 ``[n_ctx//2 - 1, V]``, exactly the
  numbers an uncached run uses, so cached and fresh results are identical);
- ``tasks-<key>.json``: the reference's flattened task metrics and per-task provenance.

The key hashes the reference's identity (:func:`model_key`: config, safetensors headers, file sizes and
modification times, or a GGUF file's size, time and head), the engine settings, the text's SHA-256, ``n_ctx``,
the chunk count, the quantforge version and (for tasks) the task list, limit, seed, source and lm-eval version.
Nothing is reused across any change of these.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .. import __version__
from ..io import atomic_dir, atomic_file

CACHE_ENV = "QUANTFORGE_CACHE"
MAX_CACHE_BYTES = 4 << 30
"""Reference logits above this size are not written (the run still works; the next one recomputes)."""


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "quantforge") / "eval"


def _stat(p: Path) -> list[Any]:
    st = p.stat()
    return [p.name, st.st_size, st.st_mtime_ns]


def model_key(path: str | os.PathLike[str]) -> str:
    """Identity of a reference model: a checkpoint folder's config, safetensors headers and file stats, or a
    GGUF's stats and first MiB. Cheap (no weights are read), and it changes whenever a file is rewritten."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        h.update(json.dumps(_stat(p)).encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
        return h.hexdigest()[:20]
    files = sorted(f for f in p.iterdir() if f.is_file() and (f.suffix in (".safetensors", ".json", ".model")))
    for f in files:
        h.update(json.dumps(_stat(f)).encode())
        if f.suffix == ".json":
            h.update(f.read_bytes())
    return h.hexdigest()[:20]


def digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def reference_key(reference: str | os.PathLike[str], engine: dict[str, Any], text_sha256: str, n_ctx: int,
                  n_chunks: int | None) -> str:
    return digest({"what": "reference-logits", "model": model_key(reference), "engine": engine,
                   "text": text_sha256, "n_ctx": n_ctx, "n_chunks": n_chunks or 0, "version": __version__})


def tasks_key(reference: str | os.PathLike[str], engine: dict[str, Any], tasks: list[str], limit: int | None,
              seed: int, source: str, lm_eval_version: str | None) -> str:
    return digest({"what": "reference-tasks", "model": model_key(reference), "engine": engine, "tasks": tasks,
                   "limit": limit, "seed": seed, "source": source, "lm_eval": lm_eval_version,
                   "version": __version__})


class CachedReference:
    """Scored reference logits read back from a cache entry (``cached[i]`` -> float32 tensor), plus its meta."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = folder
        self.meta = meta
        self.chunks: list[list[int]] = meta["chunks"]
        self.engine = None

    def __getitem__(self, i: int) -> Any:
        import numpy as np
        import torch

        return torch.from_numpy(np.load(self.folder / f"logits-{i}.npy"))

    def __len__(self) -> int:
        return len(self.chunks)


def load_reference(key: str) -> CachedReference | None:
    """The cache entry for ``key``, or ``None`` when absent or incomplete."""
    folder = cache_dir() / f"ref-{key}"
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not all((folder / f"logits-{i}.npy").is_file() for i in range(len(meta.get("chunks", [])))):
        return None
    return CachedReference(folder, meta)


def save_reference(key: str, meta: dict[str, Any], logits: Any) -> Path | None:
    """Write ``meta`` and every chunk's logits (``logits[i]``) as one entry; skipped above :data:`MAX_CACHE_BYTES`.
    A failure to write (full disk, read-only cache) only costs the reuse, never the evaluation."""
    import numpy as np

    from ..errors import OutputError

    n = len(meta["chunks"])
    first = logits[0]
    if n * first.numel() * first.element_size() > MAX_CACHE_BYTES:
        return None
    folder = cache_dir() / f"ref-{key}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(folder, force=True) as tmp:
            for i in range(n):
                np.save(tmp / f"logits-{i}.npy", logits[i].numpy())
            (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    except (OSError, OutputError):
        return None
    return folder


def load_tasks(key: str) -> dict[str, Any] | None:
    try:
        data = json.loads((cache_dir() / f"tasks-{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and {"metrics", "tasks"} <= set(data) else None


def save_tasks(key: str, metrics: dict[str, Any], tasks: dict[str, Any]) -> None:
    from ..errors import OutputError

    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        with atomic_file(cache_dir() / f"tasks-{key}.json", force=True) as tmp:
            tmp.write_text(json.dumps({"metrics": metrics, "tasks": tasks}, allow_nan=True), encoding="utf-8")
    except (OSError, OutputError):
        return
