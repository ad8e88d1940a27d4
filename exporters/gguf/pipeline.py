"""The tensor-data stage of a GGUF export as a pipeline: reads, device transfers, encoding and writes overlap.

Stages, each in its own threads, connected by bounded queues (memory stays a few row chunks, not the model):

1. **read**: a dispatcher walks the row chunks in file order and hands each to a pool of reader threads
   (:data:`READ_THREADS`), which ``pread`` the chunk's checkpoint bytes straight into a host buffer (page-locked
   when the chunk goes to a GPU) while at most :data:`READ_AHEAD_BYTES` are read and not yet consumed;
2. **encode**: one thread per device takes its share of the chunks (:func:`quantforge.distributed.partition`),
   copies the raw bytes to the device without waiting, widens them to float32, counts NaN/Inf, applies the
   Q/K permutation and the norm offset there, quantizes, and starts an asynchronous copy of the encoded bytes
   into a page-locked host buffer; on a GPU it never waits for the device (the count of bad values travels
   with the bytes);
3. **write**: the consumer (the file writer) takes the chunks in order, waits for each one's copy, checks the
   count and writes the bytes.

On the CPU the same stages run with ordinary buffers (the encode step is the C kernels, themselves spread over
``torch.get_num_threads()`` threads). The bytes are those of :meth:`EncodedTensor.encode` chunk by chunk: every
GGUF format encodes rows independently, so neither the chunk size nor the device changes them.

:func:`collect` gathers per-stage timings (:class:`Stats`) for profiling.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ...errors import CorruptCheckpoint

WRITE_THREADS = 4
"""Writer threads: each ``pwrite``s whole row chunks at their final offsets (page-cache copies run in parallel)."""
WRITE_QUEUE = 8
"""Row chunks handed to the writer threads and not yet written, at most."""
READ_THREADS = 4
"""Reader threads: enough reads in flight to keep a page cache copy or an NVMe queue busy."""
READ_AHEAD_BYTES = 1 << 30
"""Checkpoint bytes read ahead of the encoders at most (plus one chunk)."""
DEVICE_CHUNK_ELEMS = 1 << 26
"""Row-chunk size on a GPU: large enough that the per-op launch cost of the codecs stays far below their device
time (64M weights: 128 MB of bf16, a few GB of float32 search temporaries)."""
OUT_DEPTH = 3
"""Encoded chunks per device that may wait for the writer (each holds its page-locked host copy)."""


@dataclass
class Stats:
    """Seconds (summed over the threads of a stage) and bytes per stage of one export."""

    seconds: dict[str, float] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, stage: str, seconds: float, nbytes: int = 0) -> None:
        with self.lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.nbytes[stage] = self.nbytes.get(stage, 0) + nbytes

    def table(self, wall: float) -> str:
        """A Markdown table of the stages against the export's wall time."""
        lines = [f"export wall time {wall:.2f} s, {self.chunks} row chunks", "",
                 "| stage | seconds (summed over its threads) | GB | GB/s |", "|---|---|---|---|"]
        for stage, s in self.seconds.items():
            gb = self.nbytes.get(stage, 0) / 1e9
            lines.append(f"| {stage} | {s:.2f} | {gb:.2f} | {gb / s if s > 0 and gb else float('nan'):.2f} |")
        return "\n".join(lines)


_STATS: Stats | None = None


@contextlib.contextmanager
def collect(stats: Stats) -> Iterator[Stats]:
    """Record the stage timings of the exports run inside the block into ``stats``."""
    global _STATS
    old, _STATS = _STATS, stats
    try:
        yield stats
    finally:
        _STATS = old


def _add(stage: str, t0: float, nbytes: int = 0) -> None:
    if _STATS is not None:
        _STATS.add(stage, time.perf_counter() - t0, nbytes)


def chunk_elems_for(device: str, default: int) -> int:
    """Row-chunk size for ``device``: :data:`DEVICE_CHUNK_ELEMS` on GPUs, ``default`` elsewhere."""
    return DEVICE_CHUNK_ELEMS if str(device).startswith("cuda") else default


class _Stop(Exception):
    pass


@dataclass
class _Pending:
    """One encoded chunk on its way to the writer: host bytes (possibly still being copied), the device event
    that marks the copy done, and the count of NaN/Inf inputs (a host tensor filled by the same copy)."""

    data: Any
    event: Any = None
    bad: Any = None
    name: str = ""
    file: Any = None
    gpu_start: Any = None


class PipelinedStream(Iterator[Any]):
    """The encoded bytes of ``units`` (:class:`~.writer.RowChunk`), in order, as uint8 NumPy arrays.

    ``devices`` each get an encoder thread and a cost-balanced share of the chunks. The threads start at once,
    so encoding overlaps whatever the consumer does first (the file header); :meth:`close` stops them.
    ``read_threads``, ``read_ahead`` and ``out_depth`` default to :data:`READ_THREADS`, :data:`READ_AHEAD_BYTES`
    and :data:`OUT_DEPTH`.
    """

    def __init__(self, units: Sequence[Any], devices: Sequence[str], costs: Sequence[float] | None = None,
                 read_threads: int | None = None, read_ahead: int | None = None,
                 out_depth: int | None = None) -> None:
        from ...distributed import partition

        self.units, self.devices = list(units), list(devices) or ["cpu"]
        self.owners = partition(costs if costs is not None else [1.0] * len(self.units), len(self.devices))
        self.stop = threading.Event()
        self.read_ahead = READ_AHEAD_BYTES if read_ahead is None else read_ahead
        read_threads = READ_THREADS if read_threads is None else read_threads
        out_depth = OUT_DEPTH if out_depth is None else out_depth
        self.in_flight = 0
        self.cond = threading.Condition()
        self.inputs: list[queue.Queue[Any]] = [queue.Queue() for _ in self.devices]
        # a GPU's chunks wait in page-locked memory: at most OUT_DEPTH of them
        self.outputs: list[queue.Queue[tuple[bool, Any]]] = [
            queue.Queue(maxsize=max(1, min(out_depth, OUT_DEPTH) if d.startswith("cuda") else out_depth))
            for d in self.devices]
        self.fds: dict[Any, int] = {}
        self.fd_lock = threading.Lock()
        self.pos = 0
        self.pool = ThreadPoolExecutor(max(1, read_threads), thread_name_prefix="qf-pipeline-read")
        self.threads = [threading.Thread(target=self._dispatch, name="qf-pipeline-dispatch", daemon=True)]
        self.threads += [threading.Thread(target=self._encode_all, args=(k,), name=f"qf-pipeline-encode-{d}",
                                          daemon=True) for k, d in enumerate(self.devices)]
        if _STATS is not None:
            _STATS.chunks += len(self.units)
        for t in self.threads:
            t.start()

    # -- read ---------------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Submit the reads in file order, each once the read-ahead budget has room for it."""
        try:
            for i, u in enumerate(self.units):
                need = u.tensor.raw_nbytes(u.start, u.stop)
                with self.cond:
                    while self.in_flight > 0 and self.in_flight + need > self.read_ahead:
                        if self.stop.is_set():
                            raise _Stop
                        self.cond.wait(0.1)
                    if self.stop.is_set():
                        raise _Stop
                    self.in_flight += need
                pin = self.devices[self.owners[i]].startswith("cuda")
                self.inputs[self.owners[i]].put((need, self.pool.submit(self._read, u, pin)))
        except _Stop:
            return
        except BaseException as exc:  # handed to every encoder, which passes it on in order
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            for q in self.inputs:
                q.put((0, failed))

    def _fd(self, path: Any) -> int:
        with self.fd_lock:
            fd = self.fds.get(path)
            if fd is None:
                fd = self.fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def _read(self, unit: Any, pin: bool) -> Any:
        t0 = time.perf_counter()
        raw = unit.tensor.read(unit.start, unit.stop, pin=pin, fd=self._fd)
        _add("read checkpoint bytes (reader threads)", t0, unit.tensor.raw_nbytes(unit.start, unit.stop))
        return raw

    def _release(self, nbytes: int) -> None:
        with self.cond:
            self.in_flight -= nbytes
            self.cond.notify_all()

    # -- encode -------------------------------------------------------------------------------------------------
    def _put(self, k: int, value: tuple[bool, Any]) -> None:
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                self.outputs[k].put(value, timeout=0.1)
                return
            except queue.Full:
                continue

    def _encode_all(self, k: int) -> None:
        device = self.devices[k]
        try:
            if device.startswith("cuda"):
                import torch

                torch.cuda.set_device(torch.device(device))
            for i, o in enumerate(self.owners):
                if o != k:
                    continue
                need, fut = self._get_input(k)
                try:
                    t0 = time.perf_counter()
                    raw = fut.result()
                    _add("encoder waits for reads", t0)
                    pending = self._encode(self.units[i], raw, device)
                finally:
                    self._release(need)
                self._put(k, (True, pending))
        except _Stop:
            return
        except BaseException as exc:
            with contextlib.suppress(_Stop):
                self._put(k, (False, exc))

    def _get_input(self, k: int) -> tuple[int, Future[Any]]:
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                return self.inputs[k].get(timeout=0.1)
            except queue.Empty:
                continue

    def _encode(self, unit: Any, raw: Any, device: str) -> _Pending:
        import torch

        t = unit.tensor
        t0 = time.perf_counter()
        if not device.startswith("cuda"):
            data = t.encode_raw(raw, unit.start, unit.stop, device).numpy()
            _add("encode on cpu (encoder threads)", t0, data.nbytes)
            return _Pending(data)
        start = torch.cuda.Event(enable_timing=True) if _STATS is not None else None
        if start is not None:
            start.record()
        x = raw.to(device, non_blocking=True)
        rows, bad = t.prepare(x, unit.start, unit.stop, device, check=False)
        encoded = t.quantize(rows, unit.start, device)
        host = torch.empty(encoded.numel(), dtype=torch.uint8, pin_memory=True)
        host.copy_(encoded, non_blocking=True)
        if isinstance(bad, torch.Tensor):
            bad_host = torch.empty((), dtype=torch.int64, pin_memory=True)
            bad_host.copy_(bad, non_blocking=True)
        else:
            bad_host = bad
        event = torch.cuda.Event(enable_timing=start is not None)
        event.record()
        _add("queue device work (encoder threads)", t0, encoded.numel())
        info = t.src.tensors.get(t.job.hf_name) if t.job.hf_name else None
        return _Pending(host, event, bad_host, t.job.hf_name or t.job.gguf_name, info.file if info else None, start)

    # -- write --------------------------------------------------------------------------------------------------
    def __next__(self) -> Any:
        if self.pos >= len(self.owners) or self.stop.is_set():
            self.close()
            raise StopIteration
        t0 = time.perf_counter()
        ok, value = self.outputs[self.owners[self.pos]].get()
        self.pos += 1
        if not ok:
            self.close()
            raise value
        if value.event is not None:
            value.event.synchronize()
            if value.gpu_start is not None and _STATS is not None:
                _STATS.add("device: H2D + widen + quantize + D2H (GPU time)",
                           value.gpu_start.elapsed_time(value.event) / 1e3, value.data.numel())
            bad = int(value.bad)
            if bad:
                self.close()
                raise CorruptCheckpoint(f"tensor {value.name!r} has {bad} NaN/Inf values", path=value.file)
            data = value.data.numpy()
        else:
            data = value.data
        _add("writer waits for encoded chunks", t0)
        return data

    def close(self) -> None:
        """Stop every thread (each finishes the step in hand) and drop what was queued."""
        self.stop.set()
        with self.cond:
            self.cond.notify_all()
        for q in self.outputs:
            with contextlib.suppress(queue.Empty):
                while True:
                    q.get_nowait()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join()
        self.pool.shutdown(wait=True, cancel_futures=True)
        with self.fd_lock:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()

    def __del__(self) -> None:
        self.stop.set()


def write_at_offsets(path: Any, start: int, offsets: Sequence[int], chunks: Iterator[Any], units: Sequence[Any],
                     progress: Any, desc: str) -> None:
    """Write every encoded chunk of ``chunks`` (in the order of ``units``) at ``start + offsets[i]`` of the file
    ``path`` (already sized), with :data:`WRITE_THREADS` threads and at most :data:`WRITE_QUEUE` chunks queued;
    checks that each chunk has the length its unit expects."""
    from collections import deque

    from ...errors import InternalError

    fd = os.open(path, os.O_WRONLY)
    pending: deque[Future[None]] = deque()
    done = 0
    try:
        with ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="qf-pipeline-write") as pool:
            numbered = zip(range(len(units)), chunks, strict=False)  # stops at the last unit, never reads past it
            for i, data in progress(numbered, total=len(units), desc=desc, unit="chunk"):
                done += 1
                u = units[i]
                if data.nbytes != u.nbytes:
                    raise InternalError(f"{u.tensor.job.gguf_name}: encoded {data.nbytes} bytes for rows "
                                        f"{u.start}:{u.stop}, expected {u.nbytes}")
                pending.append(pool.submit(_timed_pwrite, fd, data, start + offsets[i]))
                while len(pending) > WRITE_QUEUE or (pending and pending[0].done()):
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
    finally:
        os.close(fd)
    if done != len(units):
        raise InternalError(f"the encoders delivered {done} of {len(units)} row chunks")


def _timed_pwrite(fd: int, data: Any, offset: int) -> None:
    t0 = time.perf_counter()
    view = memoryview(data).cast("B")
    n = len(view)
    while view:
        k = os.pwrite(fd, view, offset)
        view, offset = view[k:], offset + k
    _add("write (writer threads)", t0, n)
