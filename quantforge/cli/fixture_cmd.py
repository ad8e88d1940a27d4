"""``quantforge fixture smollm2 [--variant plain|dithered]``: build (once) the bf16 SmolLM2 test checkpoint."""

from __future__ import annotations

from typing import Any

from ._common import out


def add_parser(sub: Any) -> None:
    p = sub.add_parser("fixture", help="build the cached SmolLM2-135M-Instruct bf16 checkpoint used by tests")
    p.add_argument("name", choices=("smollm2",))
    p.add_argument("--variant", choices=("plain", "dithered"), default="plain")
    p.add_argument("-o", "--output", default=None, help="folder (default: the cache, ~/.cache/quantforge)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    from quantforge import fixtures

    out(str(fixtures.smollm2(args.variant, out=args.output, force=args.force)))
    return 0
