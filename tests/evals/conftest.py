"""Fixtures of the evaluation tests: SmolLM2 artifacts made by our exporters, and engines opened once per session.

Exported quants are cached under ``$QUANTFORGE_CACHE/eval-tests/<fingerprint>/``; the fingerprint hashes the
source of the exporters, kernels, format table and presets, so any change to the code that writes them makes a
fresh set. Sets untouched for a day are removed (not younger ones: another checkout may be using them). The f16
GGUF is the session-wide ``smollm2_gguf_f16`` of ``tests/conftest.py``, shared with the exporter tests.

Every test here runs torch and llama.cpp on one thread. The CI machine has two cores and is shared: with other
processes on it (load average ~5), a 30-token SmolLM2 forward took 0.17 s on one torch thread and 0.5-4 s on two
(spinning OpenMP / ggml threads), a 23-token llama.cpp eval 0.12 s on one thread and 0.26-6 s on two.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest

N_THREADS = 1
STALE_SECONDS = 24 * 3600


def _fingerprint() -> str:
    import quantforge.exporters
    import quantforge.kernels

    import quantforge

    h = hashlib.sha256()
    roots = [Path(quantforge.exporters.__file__).parent, Path(quantforge.kernels.__file__).parent]
    files = [f for r in roots for f in sorted(r.rglob("*.py"))]
    pkg = Path(quantforge.__file__).parent
    files += [pkg / "formats.py", pkg / "presets.py", pkg / "fixtures.py"]
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(N_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def artifact_cache() -> Path:
    from quantforge import fixtures

    root = fixtures.cache_root() / "eval-tests"
    d = root / _fingerprint()
    d.mkdir(parents=True, exist_ok=True)
    d.touch()
    now = time.time()
    for stale in root.iterdir():
        if stale != d and stale.is_dir() and now - stale.stat().st_mtime > STALE_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    return d


@pytest.fixture(scope="session")
def smol_gguf(smollm2_dir, smollm2_gguf_f16, artifact_cache):
    """``smol_gguf("q4_k_m")``: SmolLM2 exported by ``quantforge.exporters.gguf`` (cached; f16 per session)."""
    from quantforge.exporters.gguf import export_gguf

    def make(qtype: str) -> Path:
        if qtype == "f16":
            return smollm2_gguf_f16
        out = artifact_cache / f"smollm2-{qtype}.gguf"
        if not out.is_file():
            export_gguf(smollm2_dir, out, qtype=qtype, force=True)
        return out

    return make


@pytest.fixture(scope="session")
def smol_bnb4(smollm2_dir, artifact_cache) -> Path:
    """SmolLM2 as an nf4 bitsandbytes folder written by ``quantforge.exporters.bnb4`` (cached)."""
    from quantforge.exporters.bnb4 import export_bnb4

    out = artifact_cache / "smollm2-nf4"
    if not (out / "config.json").is_file():
        export_bnb4(smollm2_dir, out, quant_type="nf4", device="cpu", force=True)
    return out


@pytest.fixture(scope="session")
def hf_engine(smollm2_dir):
    """The bf16 checkpoint run in float32 (``qf-hf``'s default), the reference of every comparison."""
    from quantforge.evals.engines import load_hf

    engine = load_hf(smollm2_dir)
    yield engine
    engine.close()


def _llamacpp(path: Path):
    from quantforge.evals.engines import load_gguf_llamacpp

    return load_gguf_llamacpp(path, n_ctx=1024, n_threads=N_THREADS)


@pytest.fixture(scope="session")
def f16_llamacpp(smol_gguf):
    engine = _llamacpp(smol_gguf("f16"))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def q4_llamacpp(smol_gguf):
    engine = _llamacpp(smol_gguf("q4_k_m"))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def f16_torch(smol_gguf):
    from quantforge.evals.engines import load_gguf_torch

    engine = load_gguf_torch(smol_gguf("f16"))
    yield engine
    engine.close()
