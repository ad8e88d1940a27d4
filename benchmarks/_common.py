"""Shared benchmark plumbing: run a command in a fresh process, measure wall time and peak RSS, append to
RESULTS.md. Benchmarks are scripts (never tests); each compares against its anchor in the same run."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"
LLAMA_SRC = BENCH / "llama.cpp-src"
LLAMA_BIN = BENCH / "llama-build" / "bin"


def measure(cmd: list[str], env: dict[str, str] | None = None, echo: bool = False) -> tuple[float, float]:
    """Run ``cmd`` in a child process; return (wall seconds, peak RSS MiB of that child). With ``echo`` the
    child's output (progress bars included) goes straight to this process's, so a run stopped from outside still
    shows how far it got; otherwise it is kept and shown only on failure."""
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        wrapper = [sys.executable, "-c",
                   "import resource, subprocess, sys; r = subprocess.run(sys.argv[2:]); "
                   "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
                   "sys.exit(r.returncode)", rss_file.name, *cmd]
        t0 = time.perf_counter()
        proc = subprocess.run(wrapper, env={**os.environ, **(env or {})}, capture_output=not echo, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            why = "(its output is above)" if echo else proc.stderr[-3000:]
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{why}")
        return wall, int(rss_file.read()) / 1024


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_line() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} (no GPU)"


def table(header: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        out.append("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in r) + " |")
    return "\n".join(out)


def record(section: str, command: str, device: str, body: str) -> None:
    """Append a run to benchmarks/RESULTS.md under ``section`` (created if missing)."""
    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n\nEvery number here was measured by the script named in its command line.\n"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = f"\n### {stamp}\n\n- command: `{command}`\n- device: {device}\n\n{body}\n"
    heading = f"## {section}"
    if heading in text:
        start = text.index(heading) + len(heading)
        nxt = text.find("\n## ", start)
        pos = len(text) if nxt == -1 else nxt
        text = text[:pos].rstrip("\n") + "\n" + entry + text[pos:]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n" + entry
    path.write_text(text)


def peak_rss_self_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_ms(fn: Any, repeats: int) -> float:
    """Mean milliseconds of ``fn()`` over ``repeats`` calls between CUDA events, after one warm-up call."""
    import torch

    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeats
