"""Where the local evaluation data lives, and readers that turn its files into lm-eval's record layouts.

The data folder is ``$QUANTFORGE_DATA`` or, by default, ``shared/data`` beside the repository
(``<repo>/../shared/data``). Files are read in place, never copied. Each reader returns plain dicts in the
field layout of the Hugging Face dataset that the standard lm-eval task reads, so the standard prompts apply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import MissingFile

ENV_VAR = "QUANTFORGE_DATA"


def data_dir() -> Path:
    """``$QUANTFORGE_DATA`` or the ``shared/data`` folder beside the repository."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def data_file(relative: str) -> Path:
    """Path of a file in the data folder, or :class:`MissingFile` saying how to point at the data."""
    p = data_dir() / relative
    if not p.is_file():
        raise MissingFile(f"local evaluation data not found; set {ENV_VAR} to the folder holding {relative}", path=p)
    return p


def _jsonl(relative: str) -> list[dict[str, Any]]:
    with open(data_file(relative), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def hellaswag() -> list[dict[str, Any]]:
    """HellaSwag validation, the 1,000-item subset in the original fields (``ctx_a``, ``ctx_b``, ``endings`` ...).

    Not a uniform sample (913 ActivityNet / 87 WikiHow, see SOURCES.md): accuracies are not comparable with
    published full-validation numbers."""
    return [{**r, "label": str(r["label"])} for r in _jsonl("hellaswag/hellaswag_val_1k.jsonl")]


def arc(subset: str) -> list[dict[str, Any]]:
    """ARC test split (``Easy`` or ``Challenge``), AI2 layout converted to ``allenai/ai2_arc``'s fields."""
    rows = _jsonl(f"arc/ARC-{subset}-Test.jsonl")
    return [
        {
            "id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
            "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                        "label": [c["label"] for c in r["question"]["choices"]]},
        }
        for r in rows
    ]


def piqa() -> list[dict[str, Any]]:
    """PIQA validation (``goal``, ``sol1``, ``sol2``, ``label``)."""
    return [{**r, "label": int(r["label"])} for r in _jsonl("piqa/valid_with_labels.jsonl")]


def winogrande() -> list[dict[str, Any]]:
    """WinoGrande v1.1 dev, lm-eval's ``winogrande`` validation (``sentence``, ``option1/2``, ``answer``)."""
    return _jsonl("winogrande/dev.jsonl")


def lambada_openai() -> list[dict[str, Any]]:
    """LAMBADA, OpenAI's test file (``text``; the target is the last word)."""
    return _jsonl("lambada/lambada_test.jsonl")


def wikitext2_test() -> Path:
    """WikiText-2 raw test split, byte-identical to the canonical ``wiki.test.raw``."""
    return data_file("wikitext-2/wiki.test.raw")
