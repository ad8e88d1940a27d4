"""Run a worker script as several ranks of one ``torch.distributed`` job on this machine (gloo, 127.0.0.1)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port nobody listens on now, for the job's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: str, job: dict, cwd: Path, world: int = 2, timeout: float = 300) -> list[tuple[int, str, str]]:
    """Start ``python -c worker json(job)`` once per rank with torchrun's environment variables (one thread each),
    wait for all of them, and assert that each exited 0 (its stderr's tail in the message); returns
    ``(returncode, stdout, stderr)`` per rank. A rank that outlives ``timeout`` gets every rank killed."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "PYTHONSAFEPATH": "1",
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", worker, json.dumps(job)], env=env, cwd=cwd,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    logs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append((p.returncode, out, err))
    for rank, (rc, _, err) in enumerate(logs):
        assert rc == 0, f"rank {rank} exited {rc}:\n{err[-4000:]}"
    return logs
