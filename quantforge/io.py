"""Safe output: everything is written under a temporary name and renamed into place when complete.

An existing artifact is never replaced unless ``force`` is set; a failure (disk full, interrupt) leaves no
partial file or folder behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError, OutputExists


def check_output(path: str | os.PathLike[str], force: bool) -> Path:
    """Refuse an existing ``path`` unless ``force``; make sure its parent exists."""
    p = Path(path)
    if p.exists() and not force:
        raise OutputExists("output already exists; pass --force to overwrite it", path=p)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _as_output_error(exc: OSError, path: Path) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError("no space left on device while writing; nothing was kept", path=path)
    return OutputError(f"could not write ({exc.strerror or exc})", path=path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    dest = check_output(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _default_mode(0o666))
        os.replace(tmp_path, dest)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _as_output_error(exc, dest) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _default_mode(base: int) -> int:
    """``base`` less the process umask: the mode ``open()`` / ``mkdir()`` would give a new file or folder (the
    temporary names come from ``mkstemp`` / ``mkdtemp``, which create them private, 0600 / 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only if the block succeeds."""
    dest = check_output(path, force)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp_path
        os.chmod(tmp_path, _default_mode(0o777))
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if dest.is_dir():
                os.replace(dest, old)
            else:
                dest.unlink()
            os.replace(tmp_path, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, dest)
    except OSError as exc:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise _as_output_error(exc, dest) from exc
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise
