"""Argument checks every subcommand runs before it loads a model: paths, formats, plans and options.

Each check is cheap (a ``stat``, a header, a small file) and raises a typed error with one line naming the
file and the problem, so bad input is refused in well under a second instead of after minutes of work.
Nothing here creates a file or folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from quantforge.errors import InputError, MissingFile, OutputExists, UnsupportedArch


def output_file(path: str, force: bool, flag: str = "-o", example: str = "results.json") -> Path:
    """``path`` names a file to write: not a folder (nor a name ending in ``/``), not an existing file unless
    ``force``, and under a parent that is a folder where one exists."""
    p = Path(path)
    if str(path).endswith(("/", os.sep)) or p.is_dir():
        raise InputError(f"{flag} names a folder; this command writes one file: give a file name, e.g. "
                         f"{Path(path) / example}", path=path)
    if p.exists() and not force:
        raise OutputExists("output already exists; pass --force to overwrite it", path=p)
    _parent_ok(p)
    return p


def output_folder(path: str, force: bool) -> Path:
    """``path`` names a folder to write: not an existing file; an existing folder only with ``force``."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError("is a file; this command writes a folder: give a folder name", path=p)
    if p.is_dir() and not force:
        raise OutputExists("output already exists; pass --force to overwrite it", path=p)
    _parent_ok(p)
    return p


def _parent_ok(p: Path) -> None:
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"cannot write under {parent}: it is a file, not a folder", path=p)
            return


def input_file(path: str | None, what: str) -> Path | None:
    """``path`` (when given) is an existing regular file."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise InputError(f"is a folder; expected {what}", path=p)
    if not p.is_file():
        raise MissingFile(f"not found; expected {what}", path=p)
    return p


def model(model_arg: str, gguf: bool = False) -> Any:
    """Open ``model_arg`` as a :class:`~quantforge.model_source.ModelSource` (config and safetensors headers only;
    no weights are read). With ``gguf``, its ``model_type`` must have a GGUF mapping; the error names config.json."""
    from quantforge.model_source import ModelSource

    src = ModelSource.open(model_arg)
    if gguf:
        from quantforge.arch_hparams import resolve_arch

        try:
            resolve_arch(src.model_type, src.text_config)
        except UnsupportedArch as exc:
            raise UnsupportedArch(str(exc), path=Path(src.path) / "config.json") from exc
    return src


def not_for(fmt: str, given: dict[str, Any]) -> None:
    """Refuse options that the chosen ``--format`` would ignore (``{flag: value}``, ``None`` = not given)."""
    for flag, value in given.items():
        if value is not None and value is not False:
            raise InputError(f"{flag} does not apply to --format {fmt}; leave it out")


def positive(flag: str, value: int | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise InputError(f"{flag} must be {'>= 0' if allow_zero else '>= 1'}; got {value}")
