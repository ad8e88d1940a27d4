"""Importing the evaluation modules does no heavy work and registers nothing with lm-eval."""

from __future__ import annotations

import subprocess
import sys

LIGHT = ("quantforge.evals", "quantforge.evals.metrics", "quantforge.evals.gate", "quantforge.evals.schema",
         "quantforge.evals.report", "quantforge.evals.data", "quantforge.cli.eval_cmd")


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def test_light_modules_import_nothing_heavy():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in LIGHT)
            + "print(sorted(m for m in ('torch', 'lm_eval', 'transformers', 'llama_cpp', 'matplotlib', "
              "'bitsandbytes') if m in sys.modules))")
    assert _run(code) == "[]"


def test_backends_register_only_when_asked():
    code = ("from lm_eval.api.registry import model_registry\n"
            "import quantforge.evals.lm_backends as b\n"
            "print('qf-gguf' in model_registry, end=' ')\n"
            "b.register()\n"
            "print('qf-gguf' in model_registry)")
    assert _run(code) == "False True"
