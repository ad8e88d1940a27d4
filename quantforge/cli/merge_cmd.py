"""``quantforge merge``: contract placeholder until its stage lands (exits 2 with a clear message)."""

from __future__ import annotations

from typing import Any

from ._common import not_yet


def add_parser(sub: Any) -> None:
    p = sub.add_parser("merge", help="merge (not available yet)")
    p.add_argument("rest", nargs="*")
    p.set_defaults(func=not_yet("merge"))
