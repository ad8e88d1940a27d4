"""The offline tasks are lm-eval's own: same prompts, choices, targets, metrics and versions as the installed
lm-eval's task YAMLs (and their Python helpers, compared on the local documents), only the data source differs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from quantforge.evals.lm_eval_runner import LOCAL_TASKS, TASKS_DIR, resolve_tasks

LM_EVAL_YAML = {
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml", "lambada_openai": "lambada/lambada_openai.yaml",
}
SAME_KEYS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "metadata",
             "should_decontaminate", "doc_to_decontamination_query")
FUNCTION_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice", "process_docs")
# documents per local file (SOURCES.md: full splits, HellaSwag's 1,000-item subset)
SIZES = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 1000, "piqa": 1838, "winogrande": 1267,
         "lambada_openai": 5153}


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: ("!function", loader.construct_scalar(node)))


def _load(path: Path) -> dict:
    cfg = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    if "include" in cfg:
        base = _load(path.parent / cfg.pop("include"))
        cfg = {**base, **cfg}
    return cfg


def _lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"_qf_test_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_local_task_yaml_matches_lm_eval(name):
    ours = _load(TASKS_DIR / f"qf_{name}.yaml")
    theirs = _load(_lm_eval_tasks_dir() / LM_EVAL_YAML[name])
    assert ours["task"] == f"qf_{name}"
    for key in SAME_KEYS + ("process_docs",):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(b, tuple):  # a Python helper: compared on documents below
            assert isinstance(a, tuple) and key in FUNCTION_KEYS, key
        else:
            assert a == b, (key, a, b)
    split = next(s for s in ("test_split", "validation_split") if theirs.get(s))
    assert ours.get(split) and not any(ours.get(s) for s in ("training_split", "validation_split", "test_split")
                                       if s != split)


def test_python_helpers_match_lm_eval(data_dir):
    from quantforge.evals import data

    qf = _module(TASKS_DIR / "qf_tasks.py")
    wino = _module(_lm_eval_tasks_dir() / "winogrande" / "preprocess_winogrande.py")
    for doc in data.winogrande()[:200]:
        for fn in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            assert getattr(qf, f"winogrande_{fn}")(doc) == getattr(wino, fn)(doc)
    hs = _module(_lm_eval_tasks_dir() / "hellaswag" / "utils.py")
    ds = qf.load_hellaswag()["validation"].select(range(200))
    assert qf.hellaswag_process_docs(ds).to_list() == hs.process_docs(ds).to_list()


def test_local_tasks_build_offline_with_every_document(data_dir):
    from quantforge.evals.lm_eval_runner import task_manager

    pairs = resolve_tasks(LOCAL_TASKS, "local")
    assert pairs == [(n, f"qf_{n}") for n in LOCAL_TASKS]
    tasks = task_manager(local_only=True).load([t for _, t in pairs])["tasks"]
    for key, name in pairs:
        docs = list(tasks[name].eval_docs)
        assert len(docs) == SIZES[key], name
    arc = tasks["qf_arc_easy"]
    doc = arc.eval_docs[0]
    assert arc.doc_to_text(doc) == f"Question: {doc['question']}\nAnswer:"
    assert arc.doc_to_choice(doc)[arc.doc_to_target(doc)] == doc["choices"]["text"][
        doc["choices"]["label"].index(doc["answerKey"])]
