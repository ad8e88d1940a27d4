"""quantforge.io: outputs appear whole, under their final name, with the permissions a plain write would give."""

from __future__ import annotations

import os
import stat

import pytest

from quantforge.errors import OutputExists
from quantforge.io import atomic_dir, atomic_file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_gets_umask_mode_not_mkstemp_private(tmp_path, umask_022):
    out = tmp_path / "model.gguf"
    with atomic_file(out) as tmp:
        tmp.write_bytes(b"data")
        assert not out.exists()
    assert out.read_bytes() == b"data"
    assert _mode(out) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_atomic_dir_gets_umask_mode(tmp_path, umask_022):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert _mode(out) == 0o755
    assert (out / "config.json").read_text() == "{}"


def test_failure_leaves_nothing_and_existing_needs_force(tmp_path):
    out = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError), atomic_file(out) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"old")
    with pytest.raises(OutputExists):
        with atomic_file(out):
            pass
    with atomic_file(out, force=True) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"
