"""Small helpers shared by the subcommands (progress bars, console output)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """A tqdm progress bar on stderr (hidden when stderr is not a terminal and QUANTFORGE_PROGRESS is unset)."""
    import os

    from tqdm.auto import tqdm

    disable = not (sys.stderr.isatty() or os.environ.get("QUANTFORGE_PROGRESS") == "1")
    return iter(tqdm(items, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, leave=False))


def out(text: str = "") -> None:
    print(text)


def not_yet(stage: str) -> Any:
    """Handler for a stage whose issue has not landed: a clear message and exit code 2."""
    from quantforge.errors import InputError

    def run(args: Any) -> int:
        raise InputError(f"'quantforge {stage}' is not available in this version yet")

    return run
