"""Packaging guards: the mapped subpackages import from the repo folders, nothing shadows ``kernels``, every
folder with an __init__.py is listed in pyproject, and ``import quantforge`` stays light."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"kernels": "quantforge.kernels", "calibration": "quantforge.calibration", "exporters": "quantforge.exporters",
          "train": "quantforge.train", "evals": "quantforge.evals", "quantforge": "quantforge"}


def test_every_package_dir_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    for folder, pkg in MAPPED.items():
        assert cfg["package-dir"][pkg] == folder
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((pkg, *rel)) in listed, f"{init.parent} is not listed in pyproject packages"


def test_subpackages_resolve_to_repo_folders():
    for folder, pkg in MAPPED.items():
        spec = importlib.util.find_spec(pkg)
        assert spec is not None and spec.origin is not None
        assert Path(spec.origin).resolve().parent.name == folder or folder == "quantforge"


def test_top_level_kernels_is_not_ours():
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    # the PyPI package of that name may be installed (bitsandbytes imports it), also in a venv inside the repo
    assert out == "None" or not Path(out).resolve().is_relative_to((ROOT / "kernels").resolve())
    assert out == "None" or "site-packages" in out or "dist-packages" in out


def test_lean_import():
    code = "import sys, quantforge, quantforge.formats, quantforge.presets, quantforge.errors; " \
           "print(sorted(m for m in ('torch', 'triton', 'bitsandbytes', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
