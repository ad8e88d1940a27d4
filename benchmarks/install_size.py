"""Installed size of quantforge's light install and of what each extra adds, read from an installed venv.

Run with the Python of a venv that holds the full ``[test]`` install (every extra's packages). For the core
and for each extra of ``pyproject.toml`` it walks the requirement closure (``importlib.metadata``), sums the
installed files of every distribution in it, and prints what each extra adds on top of the core (packages
shared with the core counted once, in the core).

    .venv/bin/python benchmarks/install_size.py
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

EXTRAS = ("plot", "bnb", "gpu", "eval", "test")


def _name(req: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _requires(dist: md.Distribution, extra: str | None = None) -> list[str]:
    from packaging.requirements import Requirement

    out = []
    for raw in dist.requires or []:
        req = Requirement(raw)
        env = {"extra": extra or ""}
        if req.marker is None or req.marker.evaluate(env):
            if req.marker is not None and "extra" in str(req.marker) and extra is None:
                continue
            out.append(req.name)
    return out


def closure(names: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = [_name(n) for n in names]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        try:
            dist = md.distribution(n)
        except md.PackageNotFoundError:
            continue
        seen.add(n)
        todo += [_name(r) for r in _requires(dist)]
    return seen


def size_mb(names: set[str]) -> float:
    total = 0
    for n in names:
        for f in md.distribution(n).files or []:
            try:
                total += f.locate().stat().st_size
            except OSError:
                pass
    return total / 1e6


def main() -> None:
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    core = closure(project["dependencies"]) | {"quantforge"}
    print(f"core (light install): {len(core)} distributions, {size_mb(core):,.0f} MB")  # noqa: T201
    for extra in EXTRAS:
        mine = closure(project["optional-dependencies"][extra]) - core
        biggest = sorted(mine, key=lambda n: -size_mb({n}))[:4]
        print(f"[{extra}] adds {len(mine)} distributions, {size_mb(mine):,.0f} MB; largest: "  # noqa: T201
              + ", ".join(f"{n} {size_mb({n}):,.0f} MB" for n in biggest))


if __name__ == "__main__":
    sys.exit(main())
