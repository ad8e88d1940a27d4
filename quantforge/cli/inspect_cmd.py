"""``quantforge inspect FILE_OR_DIR``: tensors, types, sizes, bits per weight and metadata of an artifact."""

from __future__ import annotations

import json
from typing import Any

from ._common import out


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show tensors, types, sizes, bits per weight and metadata")
    p.add_argument("path", help="a .gguf file or a checkpoint folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    from quantforge.inspect import describe

    report = describe(args.path)
    if args.json:
        out(json.dumps(report.to_dict(), indent=1))
        return 0
    out(f"{report.path}  [{report.kind}]")
    out(f"  {len(report.tensors)} tensors, {report.total_params:,} weights, {report.total_bytes:,} bytes, "
        f"{report.bpw:.4f} bits/weight")
    out("  types: " + ", ".join(f"{k} x{v}" for k, v in report.type_counts().items()))
    for note in report.notes():
        out(f"  note: {note}")
    for key, value in report.metadata.items():
        out(f"  {key} = {value}")
    if args.tensors:
        width = max((len(t.name) for t in report.tensors), default=10)
        for t in report.tensors:
            out(f"  {t.name:<{width}}  {t.type:<7} {str(list(t.shape)):<18} {t.nbytes:>12,}  {t.bpw:6.3f} bpw")
    return 0
