"""Loaders and prompt helpers for the local task YAMLs in this folder.

lm-eval loads this file by path (``!function qf_tasks.NAME``), outside the package, so it imports quantforge
with absolute imports. The prompt helpers are lm-eval's own (hellaswag ``utils.py``, winogrande
``preprocess_winogrande.py``, lm-eval 0.4.x), repeated here because lm-eval does not ship them as modules.
"""

from __future__ import annotations

import re
from typing import Any

from quantforge.evals import data


def _dataset(split: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    import datasets

    return {split: datasets.Dataset.from_list(rows)}


def load_hellaswag(**_: Any) -> dict[str, Any]:
    return _dataset("validation", data.hellaswag())


def load_arc_easy(**_: Any) -> dict[str, Any]:
    return _dataset("test", data.arc("Easy"))


def load_arc_challenge(**_: Any) -> dict[str, Any]:
    return _dataset("test", data.arc("Challenge"))


def load_piqa(**_: Any) -> dict[str, Any]:
    return _dataset("validation", data.piqa())


def load_winogrande(**_: Any) -> dict[str, Any]:
    return _dataset("validation", data.winogrande())


def load_lambada_openai(**_: Any) -> dict[str, Any]:
    return _dataset("test", data.lambada_openai())


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset: Any) -> Any:
    def _process(doc: dict[str, Any]) -> dict[str, Any]:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_preprocess(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process)


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
