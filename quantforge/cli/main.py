"""``quantforge`` console script: one subcommand per pipeline stage.

The only place that prints and sets exit codes: a :class:`~quantforge.errors.QuantforgeError` becomes one
line on stderr and its ``exit_code`` (2 for bad input); success is 0.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("quantize", "inspect", "fixture", "calibrate", "plan", "train", "merge", "eval", "publish")


def build_parser() -> argparse.ArgumentParser:
    from quantforge import __version__

    parser = argparse.ArgumentParser(prog="quantforge", description="Quantize, calibrate, evaluate and publish LLMs.")
    parser.add_argument("--version", action="version", version=f"quantforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"quantforge.cli.{name}_cmd").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from quantforge.errors import QuantforgeError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QuantforgeError as exc:
        print(f"quantforge {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"quantforge {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
