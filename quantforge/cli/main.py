"""``quantforge`` console script: one subcommand per pipeline stage.

The only place that prints and sets exit codes: a :class:`~quantforge.errors.QuantforgeError` becomes one
line on stderr and its ``exit_code`` (2 for bad input); success is 0.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("quantize", "inspect", "fixture", "calibrate", "plan", "train", "merge", "export", "eval", "publish")


def build_parser() -> argparse.ArgumentParser:
    from quantforge import __version__

    parser = argparse.ArgumentParser(prog="quantforge", description="Quantize, calibrate, evaluate and publish LLMs.")
    parser.add_argument("--version", action="version", version=f"quantforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"quantforge.cli.{name}_cmd").add_parser(sub)
    from quantforge.cli._common import add_output_flags

    add_output_flags(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from quantforge.cli._common import end_on_broken_pipe, report_bug, report_error, setup_logging
    from quantforge.errors import QuantforgeError

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except QuantforgeError as exc:
        return report_error(args, exc)
    except KeyboardInterrupt:
        print(f"quantforge {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return end_on_broken_pipe()
    except Exception as exc:
        return report_bug(args, exc)


if __name__ == "__main__":
    sys.exit(main())
