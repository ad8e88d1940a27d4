"""The calibration folder: cache keys, the manifest, and atomic writes of its files.

A folder holds ``imatrix.gguf``, ``sensitivity.json``, ``sensitivity.png`` and ``manifest.json``. The
manifest records two keys: the imatrix key (model hash, data hashes, token budget, context) and the sensitivity
key (imatrix key plus held-out size, candidates, measurement mode and the other sensitivity settings). A run
whose keys match reuses the files; a run whose imatrix key alone matches recomputes only the sensitivity.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpoint

MANIFEST = "manifest.json"
IMATRIX = "imatrix.gguf"
SENSITIVITY = "sensitivity.json"
PLOT = "sensitivity.png"
MANIFEST_VERSION = 1
_SAMPLES = 16
_SAMPLE_BYTES = 1 << 16


def sensitivity_files(rounding: str = "rtn") -> tuple[str, str, str]:
    """``(table, plot, manifest key name)`` of the sensitivity measured under a rounding mode: the default
    rounding keeps the plain names; another mode gets its own files and key (``sensitivity-gptq.json``), so a
    folder holds one table per mode and each is cached on its own."""
    if rounding == "rtn":
        return SENSITIVITY, PLOT, "sensitivity_key"
    return f"sensitivity-{rounding}.json", f"sensitivity-{rounding}.png", f"sensitivity_key_{rounding}"


def model_hash(src: Any) -> str:
    """The source's header fingerprint plus a hash of sampled byte ranges of every weight file, so a
    fine-tuned checkpoint with the same shapes gets a different key without reading the whole model."""
    h = hashlib.sha256(src.fingerprint().encode())
    for f in sorted({t.file for t in src.tensors.values()}):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            for i in range(_SAMPLES):
                fh.seek(max(0, (size - _SAMPLE_BYTES) * i // max(_SAMPLES - 1, 1)))
                h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's manifest, or ``None`` when there is none."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorruptCheckpoint(f"calibration manifest is not valid JSON ({exc.msg}); delete it or pass --force",
                                path=p) from exc
    return data if isinstance(data, dict) else None


def cached(folder: str | os.PathLike[str], key_name: str, key: str, files: tuple[str, ...]) -> bool:
    """True when the folder's manifest has ``key_name == key`` and every file in ``files`` exists."""
    m = read_manifest(folder)
    return bool(m and m.get(key_name) == key and all((Path(folder) / f).is_file() for f in files))


def write_json(path: Path, data: Any) -> None:
    from ..io import atomic_file

    with atomic_file(path, force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def write_manifest(folder: Path, entries: dict[str, Any]) -> None:
    from .. import __version__

    data = {"version": MANIFEST_VERSION, **entries, "quantforge": __version__,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(folder / MANIFEST, data)
