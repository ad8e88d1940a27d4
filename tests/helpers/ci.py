"""What a test does when something it needs is missing: skip on a developer's machine, fail in CI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def in_ci() -> bool:
    """True under CI (``CI`` set to ``true`` or ``1``, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def shared_data(default: Path) -> Path:
    """``$QUANTFORGE_DATA`` or ``default``; when the folder is missing the calling test skips, or fails in CI."""
    env = os.environ.get("QUANTFORGE_DATA")
    path = Path(env) if env else default
    if not path.is_dir():
        message = f"shared data folder not found at {path}"
        if in_ci():
            pytest.fail(f"{message}; CI runs every test (set QUANTFORGE_DATA)")
        pytest.skip(message)
    return path
