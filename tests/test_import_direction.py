"""Dependencies point one way: the stages (every package that ``pyproject.toml`` maps besides ``quantforge`` and
``quantforge.kernels``: calibration, exporters, evals, train, ...) import only the core (``quantforge.*`` outside the
CLI, and ``quantforge.kernels``) and their own package, never another stage or the CLI; the core and the kernels
import no stage and no CLI. Only the CLI wires stages together.

Every module's imports are read with ``ast`` (relative imports resolved, imports inside functions included), so a
lazy import inside a function counts as much as one at the top of the file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
CORE_ROOTS = ("quantforge", "quantforge.kernels")
CLI = "quantforge.cli"


def package_dirs() -> dict[str, Path]:
    """Installed top-level package name -> source folder, from ``[tool.setuptools] package-dir``."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / folder for name, folder in cfg["tool"]["setuptools"]["package-dir"].items()}


def stages() -> set[str]:
    return set(package_dirs()) - set(CORE_ROOTS)


def modules() -> dict[str, Path]:
    """Every module of the installed packages: dotted name -> file."""
    dirs = package_dirs()
    out: dict[str, Path] = {}
    for pkg, folder in dirs.items():
        for f in sorted(folder.rglob("*.py")):
            parts = f.relative_to(folder).with_suffix("").parts
            if pkg == "quantforge" and parts and f"quantforge.{parts[0]}" in dirs:
                continue  # another mapped package nested in the folder (none today, but keep it unambiguous)
            name = ".".join((pkg, *parts))
            out[name.removesuffix(".__init__")] = f
    return out


def imported_names(module: str, source: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of every ``quantforge`` module or attribute ``source`` imports."""
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out += [(node.lineno, f"{prefix}.{a.name}") for a in node.names]
    return [(ln, n) for ln, n in out if n == "quantforge" or n.startswith("quantforge.")]


def owner(name: str, stage_names: set[str]) -> str:
    """Which part an imported dotted name belongs to: a stage, ``cli``, or ``core``."""
    for s in stage_names:
        if name == s or name.startswith(s + "."):
            return s
    if name == CLI or name.startswith(CLI + "."):
        return "cli"
    return "core"


def violations(module: str, source: str, is_package: bool, stage_names: set[str]) -> list[str]:
    here = owner(module, stage_names)
    if here == "cli":
        return []
    bad = []
    for line, name in imported_names(module, source, is_package):
        there = owner(name, stage_names)
        if there == "cli" or (there != "core" and there != here):
            bad.append(f"{module}:{line} imports {name} ({here} -> {there})")
    return bad


def test_stages_import_only_the_core_and_themselves():
    stage_names = stages()
    found = modules()
    bad = []
    for module, path in found.items():
        bad += violations(module, path.read_text(), path.name == "__init__.py", stage_names)
    assert not bad, "imports against the dependency direction:\n" + "\n".join(bad)


def test_every_stage_and_the_core_are_scanned():
    """The scan sees real modules of each part (so an empty scan cannot pass), train/ included."""
    stage_names = stages()
    assert {"quantforge.calibration", "quantforge.exporters", "quantforge.evals", "quantforge.train"} <= stage_names
    found = modules()
    for part in (*stage_names, *CORE_ROOTS, CLI):
        assert any(m == part or m.startswith(part + ".") for m in found), part
    assert "quantforge.exporters.gguf.writer" in found and "quantforge.arch" in found
    assert "quantforge.calibration.pipeline" in found


def test_no_test_helpers_in_the_installed_package():
    """Test helpers (reference runs, fake servers, tiny checkpoints) live in tests/helpers, not in the package."""
    shipped = [name for name in modules() if name.rpartition(".")[2].startswith(("testing", "test_"))]
    assert not shipped, f"move these to tests/helpers: {shipped}"


@pytest.mark.parametrize("module, is_package, source, expected", [
    ("quantforge.calibration.refs", False, "from ..exporters.gguf import arch", "exporters"),
    ("quantforge.exporters.gguf.writer", False, "def f():\n    from ...calibration.imatrix import x", "calibration"),
    ("quantforge.evals", True, "import quantforge.train.loop", "train"),
    ("quantforge.train.loop", False, "from quantforge import evals", "evals"),
    ("quantforge.planner", False, "from .exporters.gguf.writer import plan_tensors", "exporters"),
    ("quantforge.kernels.q4_k", False, "from ..calibration import candidates", "calibration"),
    ("quantforge.exporters.bnb4", False, "from ..cli._common import x", "cli"),
])
def test_checker_flags_each_kind_of_violation(module, is_package, source, expected):
    bad = violations(module, source, is_package, stages())
    assert len(bad) == 1 and bad[0].endswith(f"{expected})"), bad


@pytest.mark.parametrize("module, is_package, source", [
    ("quantforge.calibration.refs", False, "from ..arch import gguf_name\nfrom .runner import DecoderRunner"),
    ("quantforge.exporters.gguf.writer", False, "from ... import arch\nfrom ...kernels import q4_k\nfrom . import x"),
    ("quantforge.train", True, "from quantforge.kernels.nf4 import dequantize\nfrom .loop import train"),
    ("quantforge.cli.plan_cmd", False, "from quantforge.calibration import store\nimport quantforge.exporters"),
])
def test_checker_allows_core_own_package_and_cli_glue(module, is_package, source):
    assert violations(module, source, is_package, stages()) == []
