"""Small helpers shared by the subcommands: console output, status logging, progress bars, and how the console
script ends (errors, bugs, a closed pipe)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

LOGGER = "quantforge"
_state = {"quiet": False}


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """A tqdm progress bar on stderr (hidden when stderr is not a terminal and QUANTFORGE_PROGRESS is unset, and
    under ``--quiet``)."""
    from tqdm.auto import tqdm

    disable = _state["quiet"] or not (sys.stderr.isatty() or os.environ.get("QUANTFORGE_PROGRESS") == "1")
    return iter(tqdm(items, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, leave=False))


def out(text: str = "") -> None:
    """The command's result on stdout (kept under ``--quiet``: it is what the command was run for)."""
    print(text)  # noqa: T201 (the CLI is the layer that prints)


def log() -> logging.Logger:
    """The status logger: INFO lines on stderr by default, DEBUG with ``--verbose``, warnings only with ``--quiet``."""
    return logging.getLogger(LOGGER)


def add_output_flags(sub: Any) -> None:
    """``--verbose`` / ``--quiet`` on every subcommand (they set the ``quantforge`` logger's level)."""
    for parser in sub.choices.values():
        group = parser.add_argument_group("output")
        flags = group.add_mutually_exclusive_group()
        flags.add_argument("--verbose", action="store_true",
                           help="debug messages, and the traceback of an internal error")
        flags.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr; no progress bars")


def setup_logging(args: Any) -> None:
    """Route the ``quantforge`` logger to stderr at the level ``--verbose`` / ``--quiet`` ask for."""
    verbose, quiet = bool(getattr(args, "verbose", False)), bool(getattr(args, "quiet", False))
    _state["quiet"] = quiet
    logger = log()
    for handler in [h for h in logger.handlers if getattr(h, "_quantforge_cli", False)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler._quantforge_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """A stream handler that looks ``sys.stderr`` up at each record (tests swap it), not once at creation."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def show_traceback(args: Any, exc: BaseException) -> None:
    """Under ``--verbose``, the traceback of ``exc`` on stderr before its one-line message."""
    if getattr(args, "verbose", False):
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


def report_error(args: Any, exc: Any) -> int:
    """A :class:`~quantforge.errors.QuantforgeError`: its one line and its exit code (2 for bad input, 1 for a
    failed gate); an :class:`~quantforge.errors.InternalError` is reported as the bug it is."""
    from quantforge.errors import InternalError

    if isinstance(exc, InternalError):
        return report_bug(args, exc)
    show_traceback(args, exc)
    print(f"quantforge {args.command}: error: {exc}", file=sys.stderr)  # noqa: T201
    return int(exc.exit_code)


def report_bug(args: Any, exc: BaseException) -> int:
    """An exception quantforge did not raise on purpose: a bug of ours, never bad input. One line (the traceback
    too under ``--verbose``) and :data:`~quantforge.errors.BUG_EXIT_CODE`, distinct from the gate's 1 and input's 2."""
    from quantforge.errors import BUG_EXIT_CODE

    show_traceback(args, exc)
    hint = "" if getattr(args, "verbose", False) else "; re-run with --verbose for the traceback"
    message = " ".join(str(exc).split()) or "(no message)"
    print(f"quantforge {args.command}: internal error (a bug in quantforge, please report it): "  # noqa: T201
          f"{type(exc).__name__}: {message}{hint}", file=sys.stderr)
    return BUG_EXIT_CODE


def end_on_broken_pipe() -> int:
    """stdout's reader went away (``quantforge inspect --json | head``): stop quietly, like a Unix filter. stdout is
    pointed at /dev/null so the interpreter's final flush does not complain either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 0
