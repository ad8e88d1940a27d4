"""The ``results.json`` schema (version 1): what ``quantforge eval`` writes and what the gate and publish read.

Top level::

    schema_version  1
    quantforge_version, created (UTC ISO-8601), seed, lm_eval_version (null when no task ran)
    settings        {n_ctx, n_chunks, text, text_sha256, limit, kld_base, device, task_source}
    tasks           {<task>: {lm_eval_task, version, n_shot, n_samples, source}}
    reference       an artifact entry (below) for the reference model; its KLD is 0 by definition
    artifacts       [artifact entry, ...]
    gate            optional: {passed, baseline, limits, compared, skipped,
                    failures: [{artifact, metric, baseline, value, limit}]}

Artifact entry: ``name`` (file or folder name; the gate matches artifacts by it), ``path``, ``format``
(gguf / bnb4 / hf), ``type`` (q4_k_m, nf4, bf16 ...), ``plan`` (or null), ``size_bytes``, ``bpw``, ``engine``
(hf / torch / llama.cpp),
``tokenizer_match`` and ``metrics``: ``ppl``, ``kld_mean``, ``kld_median``, ``kld_p99``, ``top1`` and their
companions (``ppl_err``, ``kld_err``, ``kld_p999``, ``kld_max``, ``top1_err``, ``rms_dp``, ``ln_ppl_ratio``,
``n_tokens``), plus ``<task>_<metric>`` and ``<task>_<metric>_stderr`` per task (``arc_easy_acc`` ...).
Non-finite numbers are written as null.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import InputError

SCHEMA_VERSION = 1
TOP_KEYS = {"schema_version", "quantforge_version", "created", "seed", "lm_eval_version", "settings", "tasks",
            "reference", "artifacts", "gate"}
REQUIRED_TOP = TOP_KEYS - {"gate"}
ARTIFACT_KEYS = {"name", "path", "format", "type", "plan", "size_bytes", "bpw", "engine", "tokenizer_match",
                 "metrics"}
REQUIRED_METRICS = ("ppl", "kld_mean", "kld_median", "kld_p99", "top1")


def clean_number(value: Any) -> Any:
    """JSON-safe value: non-finite floats become ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def clean(obj: Any) -> Any:
    """Recursively replace non-finite floats by ``None`` (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return clean_number(obj)


def validate(results: Any, source: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Check a results document against schema version 1; unknown keys and missing metrics are errors."""
    where = {"path": source} if source is not None else {}
    if not isinstance(results, dict):
        raise InputError("expected a JSON object at the top of the results file", **where)
    version = results.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InputError(f"expected schema_version {SCHEMA_VERSION}, got {version!r}; re-run quantforge eval "
                         "with this version to regenerate the file", **where)
    unknown = set(results) - TOP_KEYS
    missing = REQUIRED_TOP - set(results)
    if unknown or missing:
        raise InputError(f"results keys do not match schema {SCHEMA_VERSION}: unknown {sorted(unknown)}, "
                         f"missing {sorted(missing)}", **where)
    if not isinstance(results["artifacts"], list):
        raise InputError("'artifacts' must be a list", **where)
    for i, art in enumerate([results["reference"], *results["artifacts"]]):
        label = "reference" if i == 0 else f"artifacts[{i - 1}]"
        if not isinstance(art, dict):
            raise InputError(f"{label} must be an object", **where)
        a_unknown = set(art) - ARTIFACT_KEYS
        a_missing = ARTIFACT_KEYS - set(art)
        if a_unknown or a_missing:
            raise InputError(f"{label} keys do not match schema {SCHEMA_VERSION}: unknown {sorted(a_unknown)}, "
                             f"missing {sorted(a_missing)}", **where)
        lacking = [m for m in REQUIRED_METRICS if m not in art["metrics"]]
        if lacking:
            raise InputError(f"{label} ({art.get('name')}) lacks metrics {lacking}", **where)
    names = [a["name"] for a in results["artifacts"]]
    if len(set(names)) != len(names):
        raise InputError(f"artifact names must be unique; got {names}", **where)
    return results


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a results file."""
    p = Path(path)
    if not p.is_file():
        raise InputError("no such results file", path=p)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not a JSON results file ({exc})", path=p) from exc
    return validate(doc, p)


def dumps(results: dict[str, Any]) -> str:
    """Stable JSON text (sorted nowhere: the schema order is the reading order)."""
    return json.dumps(clean(results), indent=1, allow_nan=False) + "\n"
