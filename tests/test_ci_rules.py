"""A test that needs the shared data folder skips without it on a developer's machine and fails in CI."""

from __future__ import annotations

import pytest
from helpers.ci import shared_data


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("1", pytest.fail.Exception),
                                         ("", pytest.skip.Exception), ("false", pytest.skip.Exception)])
def test_missing_shared_data_fails_only_in_ci(monkeypatch, tmp_path, ci, outcome):
    monkeypatch.setenv("CI", ci)
    monkeypatch.delenv("QUANTFORGE_DATA", raising=False)
    with pytest.raises(outcome, match="shared data folder not found"):
        shared_data(tmp_path / "missing")


def test_present_shared_data_is_returned(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("QUANTFORGE_DATA", str(tmp_path))
    assert shared_data(tmp_path / "elsewhere") == tmp_path
