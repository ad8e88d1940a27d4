"""How many CPU threads an evaluation uses by default: the cores idle right now (at least 1, at most 8).

torch and llama.cpp both synchronise their threads after every operation, so a thread that the scheduler puts
behind another process's work holds up the rest. On the shared 2-core machine with other work running (load
average ~10) the default eval of one SmolLM2 artifact took 673 s on two threads and 128 s on one (see
``benchmarks/RESULTS.md``, "Evaluation speed"); on the idle machine two threads are faster. The idle share is
measured over a short window from ``/proc/stat`` (not the load average, which still counts work that has just
ended for a minute). Results do not depend on the thread count: torch's and llama.cpp's logits are
bit-identical on one and two threads for the evaluated models.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

MAX_THREADS = 8
SAMPLE_SECONDS = 0.25


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """``(idle, total)`` jiffies over all CPUs, or ``None`` where ``/proc/stat`` is unreadable."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return idle, sum(values[:8])  # user .. steal; guest time is already inside user


def idle_cores(window: float = SAMPLE_SECONDS) -> float:
    """How many cores were idle during ``window`` seconds (fractional); the load average where ``/proc/stat``
    is missing."""
    cores = usable_cores()
    first = _cpu_times()
    if first is None:
        return max(0.0, cores - os.getloadavg()[0])
    time.sleep(window)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return float(cores)
    share = (second[0] - first[0]) / (second[1] - first[1])
    return cores * max(0.0, min(1.0, share))


def default_threads() -> int:
    """The idle cores rounded to the nearest whole one, within ``1 .. min(usable cores, 8)``."""
    return max(1, min(usable_cores(), MAX_THREADS, int(idle_cores() + 0.5)))
