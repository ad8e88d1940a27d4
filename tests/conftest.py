"""Shared pytest fixtures. Tests live in folders mirroring the source tree; there is no tests/__init__.py."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
