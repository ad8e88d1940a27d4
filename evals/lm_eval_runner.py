"""Run lm-eval tasks on an open engine and flatten the results into ``<task>_<metric>`` keys.

Task names are the standard lm-eval ones (``hellaswag``, ``arc_easy``, ``arc_challenge``, ``piqa``,
``winogrande``, ``lambada_openai``). With ``source="local"`` they run as our offline twins from
:data:`TASKS_DIR` (``qf_<name>``: same prompts, metrics and versions, data read from the local data folder);
with ``source="hub"`` lm-eval's own tasks run (they download their data). ``auto`` picks local when the data
folder exists. Any other lm-eval task name runs as given.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .data import data_dir

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai")
SOURCES = ("auto", "local", "hub")
LOCAL_PREFIX = "qf_"


@dataclass
class TaskResults:
    """Flattened metrics (``arc_easy_acc``, ``arc_easy_acc_stderr`` ...) and per-task provenance."""

    metrics: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)


def resolve_tasks(names: Sequence[str], source: str = "auto") -> list[tuple[str, str]]:
    """``(key, lm_eval_task_name)`` pairs; ``key`` is the standard name used in metric keys."""
    if source not in SOURCES:
        raise InputError(f"unknown task source {source!r}; expected one of {', '.join(SOURCES)}")
    if source == "auto":
        source = "local" if data_dir().is_dir() else "hub"
    pairs = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name.startswith(LOCAL_PREFIX) and name[len(LOCAL_PREFIX):] in LOCAL_TASKS:
            pairs.append((name[len(LOCAL_PREFIX):], name))
        elif source == "local" and name in LOCAL_TASKS:
            pairs.append((name, LOCAL_PREFIX + name))
        else:
            pairs.append((name, name))
    return pairs


def task_manager(local_only: bool = False) -> Any:
    """An lm-eval ``TaskManager`` that indexes our local task YAMLs, and lm-eval's own unless ``local_only``
    (indexing lm-eval's ~15k task files takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=not local_only)


def run_tasks(lm: Any, names: Sequence[str], limit: int | None = None, seed: int = 1234, source: str = "auto",
              num_fewshot: int | None = None, manager: Any = None) -> TaskResults:
    """Evaluate ``lm`` (an lm-eval ``LM``) on ``names``; ``limit`` caps the documents per task."""
    import lm_eval

    pairs = resolve_tasks(names, source)
    if not pairs:
        return TaskResults()
    manager = manager or task_manager(local_only=all(t.startswith(LOCAL_PREFIX) for _, t in pairs))
    known = set(manager.all_tasks)
    unknown = [t for _, t in pairs if t not in known]
    if unknown:
        raise InputError(f"unknown lm-eval task(s) {', '.join(unknown)}; local tasks are "
                         f"{', '.join(LOCAL_TASKS)} (or their {LOCAL_PREFIX} names)")
    with _quiet_lm_eval():
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[t for _, t in pairs], limit=limit, num_fewshot=num_fewshot, task_manager=manager,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            bootstrap_iters=1000, log_samples=False,
        )
    return flatten(out, pairs)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs a warning per custom-dataset task; keep its logger at ERROR for the call, then restore it."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def flatten(out: dict[str, Any], pairs: Sequence[tuple[str, str]]) -> TaskResults:
    """``{"acc,none": .., "acc_stderr,none": ..}`` per task -> ``{"<key>_acc": .., "<key>_acc_stderr": ..}``."""
    res = TaskResults()
    for key, name in pairs:
        row = out["results"].get(name, {})
        for metric, value in row.items():
            if "," not in metric or not isinstance(value, (int, float)):
                continue
            base, filt = metric.split(",", 1)
            suffix = "" if filt == "none" else f"_{filt}"
            res.metrics[f"{key}_{base}{suffix}"] = float(value) if math.isfinite(float(value)) else float("nan")
        res.tasks[key] = {
            "lm_eval_task": name,
            "version": out.get("versions", {}).get(name),
            "n_shot": out.get("n-shot", {}).get(name),
            "n_samples": (out.get("n-samples", {}).get(name) or {}).get("effective"),
            "source": "local" if name.startswith(LOCAL_PREFIX) else "hub",
        }
    return res
