"""Fixtures of the trainer tests: tiny random checkpoints of every supported family, and the PyTorch reference
path of the kernels (the Triton kernels have their own interpreter tests; one trainer test runs them too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.train_models import ARCHS, build_tiny


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """Run the kernels' PyTorch references (same public functions; the interpreter is far too slow for whole
    models). Triton's availability is settled first, so later kernel tests still get the interpreter."""
    from quantforge.kernels._triton import triton_available

    triton_available()
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {a: build_tiny(a, root / a) for a in ARCHS}


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random llama with SmolLM2's tokenizer and chat template (fast end-to-end training runs)."""
    return build_tiny("llama", tmp_path_factory.mktemp("tinychat") / "llama", tokenizer_from=smollm2_dir)
