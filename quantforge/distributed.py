"""Scale-out plumbing on PyTorch's own distributed engine (``torch.distributed``: NCCL on GPUs, gloo on CPU).

* :class:`Group`: this process's rank in the job and the few collectives the stages need (broadcast a decision
  of rank 0, gather small Python objects, sum float tensors, send encoded bytes to rank 0).
* :func:`launch` / :func:`init_from_env`: join the job ``torchrun`` describes in the environment (``WORLD_SIZE``,
  ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); one plain process is a group of one.
* :func:`partition`: a deterministic, cost-balanced owner for every work item, the same on every rank.
* :func:`ordered_map` / :func:`ordered_stream`: encode items on several devices (threads) or ranks, and hand
  the results back in the items' fixed order with bounded memory, so one writer produces byte-identical files.

Library code reads :func:`current`; only the CLI (or the user's script) creates and destroys the process group.
Nothing here imports torch until it is called.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from . import errors
from .errors import InputError, QuantforgeError

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_TIMEOUT_S = 3600
SHARED_FS_ENV = "QUANTFORGE_SHARED_FS"
_OK, _FAILED = 0, 1


class DistributedError(QuantforgeError):
    """Another rank of the job failed, or the job's environment is inconsistent."""


@dataclass(frozen=True)
class Group:
    """This process's place in the job. ``backend is None`` means a single process (every collective is the
    identity); otherwise the default ``torch.distributed`` process group is initialized."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reads caches, writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.world > 1

    @property
    def comm_device(self) -> str:
        """Where tensors must be for this backend's collectives (NCCL: this rank's GPU)."""
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"

    def local_device(self, device: str) -> str:
        """``device`` for this rank: a bare ``cuda`` becomes ``cuda:{local_rank}`` in a distributed job, and
        ``cuda:{current device}`` otherwise (threads start on GPU 0, so the index is always made explicit)."""
        if device != "cuda":
            return device
        import torch

        if not torch.cuda.is_available():
            raise InputError("device 'cuda' asked for, but this PyTorch sees no GPU; use --device cpu")
        return f"cuda:{self.local_rank if self.distributed else torch.cuda.current_device()}"

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` on rank 0 only (file-system checks, cache reads) and return its result on every rank; a
        :class:`QuantforgeError` it raises is raised on every rank, so all ranks stop together."""
        if not self.distributed:
            return fn()
        outcome: tuple[bool, Any] = (True, None)
        failure: BaseException | None = None
        if self.is_main:
            try:
                outcome = (True, fn())
            except QuantforgeError as exc:
                outcome = (False, exc)
            except Exception as exc:  # raised as it is on rank 0; the other ranks learn that it stopped
                failure = exc
                outcome = (False, DistributedError(f"rank 0 failed: {type(exc).__name__}: {exc}"))
        ok, value = self.broadcast_object(outcome)
        if failure is not None:
            raise failure
        if not ok:
            raise value
        return value

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, tensors: Sequence[Any]) -> list[Any]:
        """Element-wise sums over ranks of ``tensors`` (same shapes on every rank), as float64 CPU tensors.

        One flat collective for the whole list; summing in float64 keeps the result within rounding of a
        one-process sum."""
        import torch

        flat = [torch.as_tensor(t).detach().reshape(-1).to("cpu", torch.float64) for t in tensors]
        if not self.distributed or not flat:
            return [f.reshape(torch.as_tensor(t).shape) for f, t in zip(flat, tensors, strict=True)]
        import torch.distributed as dist

        buf = torch.cat(flat).to(self.comm_device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        parts = buf.cpu().split([f.numel() for f in flat])
        return [p.reshape(torch.as_tensor(t).shape) for p, t in zip(parts, tensors, strict=True)]

    def all_reduce_(self, tensors: Sequence[Any]) -> list[Any]:
        """Sum ``tensors`` over ranks in place, in their own dtype, on the collective's device (NCCL: each
        rank's GPU; tensors elsewhere make a round trip). Large float32 sums (Fisher information) stay on the
        GPU, which :meth:`all_reduce_sum`'s float64 host copies would not."""
        if not self.distributed:
            return list(tensors)
        import torch.distributed as dist

        for t in tensors:
            if str(t.device) == self.comm_device or (t.device.type == "cpu" and self.comm_device == "cpu"):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
            else:
                moved = t.to(self.comm_device)
                dist.all_reduce(moved, op=dist.ReduceOp.SUM)
                t.copy_(moved)
        return list(tensors)

    def send_bytes(self, data: Any, dst: int = 0) -> None:
        """Send one encoded item (a uint8 tensor on any device) to ``dst``: a header (status, length), then the
        bytes. Point-to-point messages between two ranks arrive in the order they were sent."""
        self._send(_OK, data, dst)

    def send_error(self, exc: BaseException, dst: int = 0) -> None:
        """Tell ``dst``, which waits for bytes from this rank, that this rank failed and why."""
        import torch

        if isinstance(exc, QuantforgeError):
            kind, message = type(exc).__name__, str(exc)
        else:
            kind, message = "DistributedError", f"{type(exc).__name__}: {exc}"
        text = json.dumps({"type": kind, "message": message}).encode()
        self._send(_FAILED, torch.frombuffer(bytearray(text), dtype=torch.uint8), dst)

    def _send(self, status: int, data: Any, dst: int) -> None:
        import torch
        import torch.distributed as dist

        payload = data.reshape(-1).to(self.comm_device)
        header = torch.tensor([status, payload.numel()], dtype=torch.int64, device=self.comm_device)
        try:
            dist.send(header, dst)
            dist.send(payload, dst)
            if payload.is_cuda:  # NCCL's send returns once queued: wait for it, so unsent items cannot pile up
                torch.cuda.current_stream(payload.device).synchronize()
        except RuntimeError as exc:
            raise DistributedError(f"rank {self.rank}: could not send to rank {dst} ({exc}); "
                                   f"rank {dst} probably stopped: see its error") from exc

    def recv_bytes(self, src: int, expected: int | None = None) -> Any:
        """The next item ``src`` sends (see :meth:`send_bytes`) as a uint8 numpy array; a failure ``src``
        reported is raised here with its type (``CorruptCheckpoint`` stays ``CorruptCheckpoint``)."""
        import torch
        import torch.distributed as dist

        header = torch.empty(2, dtype=torch.int64, device=self.comm_device)
        try:
            dist.recv(header, src)
            status, n = (int(v) for v in header.tolist())
            buf = torch.empty(n, dtype=torch.uint8, device=self.comm_device)
            dist.recv(buf, src)
        except RuntimeError as exc:
            raise DistributedError(f"rank {self.rank}: lost rank {src} while waiting for its data ({exc})") from exc
        data = buf.cpu().numpy()
        if status != _OK:
            raise _remote_error(src, data.tobytes())
        if expected is not None and n != expected:
            raise DistributedError(f"rank {src} sent {n} bytes for an item of {expected} bytes; every rank must run "
                                   "the same quantforge version on the same inputs")
        return data


SINGLE = Group()
_override: contextvars.ContextVar[Group | None] = contextvars.ContextVar("quantforge_group", default=None)


def _remote_error(src: int, raw: bytes) -> QuantforgeError:
    try:
        info = json.loads(raw.decode())
        kind, message = str(info["type"]), str(info["message"])
    except (ValueError, KeyError, UnicodeDecodeError):
        kind, message = "DistributedError", raw[:500].decode(errors="replace")
    cls = getattr(errors, kind, None) if kind != "DistributedError" else DistributedError
    if not (isinstance(cls, type) and issubclass(cls, QuantforgeError)):
        cls = DistributedError
    return cls(f"rank {src}: {message}")


def env_world(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's variables; ``(0, 1, 0)`` when they are absent."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return 0, 1, 0
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise DistributedError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers ({exc}); launch with torchrun") from exc
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(f"inconsistent job: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}; "
                               "launch with torchrun")
    return rank, world, local


def current() -> Group:
    """The group the stages run in: the initialized default process group, else a single process."""
    forced = _override.get()
    if forced is not None:
        return forced
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    rank, backend = dist.get_rank(), dist.get_backend()
    local = os.environ.get("LOCAL_RANK")
    if local is None:  # a group made without torchrun (e.g. torch.multiprocessing.spawn)
        import torch

        local_rank = torch.cuda.current_device() if backend == "nccl" else rank
    else:
        local_rank = int(local)
    return Group(rank, dist.get_world_size(), local_rank, backend)


@contextlib.contextmanager
def single_process() -> Iterator[Group]:
    """Inside the block, :func:`current` is a group of one even in a distributed job (benchmark baselines)."""
    token = _override.set(SINGLE)
    try:
        yield SINGLE
    finally:
        _override.reset(token)


def backend_for(device: str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def init_from_env(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
    """Initialize the default process group from torchrun's environment (``env://``) with the backend that
    suits ``device``; on CUDA, bind this process to GPU ``LOCAL_RANK``. Returns the group (a group of one when
    ``WORLD_SIZE`` is absent or 1)."""
    rank, world, local = env_world()
    if world == 1:
        return SINGLE
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set; launch with torchrun")
    import torch
    import torch.distributed as dist

    backend = backend_for(device)
    if backend == "nccl":
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise InputError(f"rank {rank} needs GPU {local} (LOCAL_RANK) but sees "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; "
                             "run at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local)
    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "rank": rank, "world_size": world,
                              "timeout": timedelta(seconds=timeout_s)}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group(**kwargs)
    return Group(rank, world, local, backend)


@contextlib.contextmanager
def launch(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Group]:
    """The group for one command: joins torchrun's job when the environment describes one (and no group exists
    yet), and leaves it on exit; an existing process group is used as it is and left alone."""
    if env_world()[1] == 1:
        yield current()
        return
    import torch.distributed as dist

    if dist.is_initialized():
        yield current()
        return
    group = init_from_env(device, timeout_s)
    try:
        yield group
    finally:
        dist.destroy_process_group()


def partition(costs: Sequence[float], parts: int) -> list[int]:
    """Owner (``0 .. parts - 1``) of each item: items in order go to the least-loaded part so far (ties to the
    lowest index). Deterministic, balanced to within one item, and interleaved along the order, which keeps
    every part busy while a writer consumes the items in order."""
    if parts < 1:
        raise InputError(f"cannot split work into {parts} parts")
    load = [0.0] * parts
    owners = []
    for c in costs:
        k = min(range(parts), key=lambda i: (load[i], i))
        owners.append(k)
        load[k] += max(float(c), 1e-9)
    return owners


def shard_batches(items: Sequence[T], batch_size: int, group: Group) -> list[T]:
    """This rank's share of ``items`` cut into batches of ``batch_size``: whole batches, every ``world``-th one,
    so each batch has the composition (and the numerics) it has in a one-process run."""
    batches = [list(items[i:i + batch_size]) for i in range(0, len(items), max(1, batch_size))]
    return [x for b in batches[group.rank::group.world] for x in b]


def parse_devices(text: str | None) -> list[str] | None:
    """``"cuda:0,cuda:1"`` -> ``["cuda:0", "cuda:1"]`` (``None`` for an empty option)."""
    if not text:
        return None
    devices = [d.strip() for d in text.split(",") if d.strip()]
    for d in devices:
        if not (d == "cpu" or d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
            raise InputError(f"--devices takes cpu, cuda or cuda:N separated by commas, got {d!r}")
    return devices


class _Stop(Exception):
    pass


def ordered_map(fn: Callable[[T, str], R], items: Sequence[T], devices: Sequence[str],
                costs: Sequence[float] | None = None, depth: int = 2, threaded: bool | None = None) -> Iterator[R]:
    """``fn(item, device)`` for every item, yielded in the items' order.

    With several devices (or ``threaded``) one thread per device works through its share (:func:`partition`
    of ``costs``) and keeps at most ``depth`` results waiting, so memory stays bounded however far the consumer
    lags. The threads start at once, before the first result is asked for, so the work overlaps whatever the
    caller does first (a file header, say). A failure in a thread is raised here, in order; ``close()`` on the
    returned iterator stops the threads (call it, e.g. through ``contextlib.closing``, if it may not be drained).
    """
    devices = list(devices) or ["cpu"]
    if threaded is None:
        threaded = len(devices) > 1
    if not threaded:
        return (fn(it, devices[0]) for it in items)
    return _ThreadedMap(fn, items, devices, costs, depth)


class _ThreadedMap(Iterator[R]):
    """The threaded :func:`ordered_map`: one worker thread per device, results handed over in item order."""

    def __init__(self, fn: Callable[[T, str], R], items: Sequence[T], devices: list[str],
                 costs: Sequence[float] | None, depth: int) -> None:
        self.fn, self.items, self.devices = fn, items, devices
        self.owners = partition(costs if costs is not None else [1.0] * len(items), len(devices))
        self.queues: list[queue.Queue[tuple[bool, Any]]] = [queue.Queue(maxsize=max(1, depth)) for _ in devices]
        self.stop = threading.Event()
        self.pos = 0
        self.threads = [threading.Thread(target=self._work, args=(k,), name=f"quantforge-{d}", daemon=True)
                        for k, d in enumerate(devices)]
        for t in self.threads:
            t.start()

    def _put(self, q: queue.Queue[tuple[bool, Any]], value: tuple[bool, Any]) -> None:
        while True:
            if self.stop.is_set():
                raise _Stop
            try:
                q.put(value, timeout=0.1)
                return
            except queue.Full:
                continue

    def _work(self, k: int) -> None:
        try:
            if self.devices[k].startswith("cuda"):
                import torch

                torch.cuda.set_device(torch.device(self.devices[k]))
            for it, o in zip(self.items, self.owners, strict=True):
                if o == k:
                    self._put(self.queues[k], (True, self.fn(it, self.devices[k])))
        except _Stop:
            return
        except BaseException as exc:  # handed to the consumer, which raises it in order
            with contextlib.suppress(_Stop):
                self._put(self.queues[k], (False, exc))

    def __next__(self) -> R:
        if self.pos >= len(self.owners) or self.stop.is_set():
            self.close()
            raise StopIteration
        ok, value = self.queues[self.owners[self.pos]].get()
        self.pos += 1
        if not ok:
            self.close()
            raise value
        return value

    def close(self) -> None:
        """Stop the workers (they finish the item in hand) and drop what they queued."""
        self.stop.set()
        for q in self.queues:
            with contextlib.suppress(queue.Empty):
                while True:
                    q.get_nowait()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join()

    def __del__(self) -> None:
        if not self.stop.is_set():
            self.stop.set()


def ordered_stream(items: Sequence[T], encode: Callable[[T, str], Any], nbytes: Callable[[T], int],
                   costs: Sequence[float], group: Group, devices: Sequence[str], depth: int = 2) -> Iterator[Any]:
    """Encode ``items`` across the ranks of ``group`` (and each rank's ``devices``) and deliver every item's
    bytes, in order, on rank 0.

    Items are split by :func:`partition` of ``costs`` (the same on every rank). Rank 0 yields one uint8 numpy
    array per item, encoding its own share in a background thread and receiving the others' from their owners as
    it reaches them; other ranks encode their share, send it to rank 0 and yield nothing. A rank holds at most
    ``depth`` encoded items beyond the one in flight, so memory stays bounded by a few items, not the model.
    ``encode(item, device)`` returns a uint8 tensor; ``nbytes(item)`` is its expected length.

    A failure on another rank reaches rank 0 in order, with its type, and stops it. A failure on rank 0 stops
    rank 0 only: the others stay blocked in ``send`` until its process exits (torchrun then stops them all) or
    the group's timeout passes.
    """
    if not group.distributed:
        # always threaded: the next items encode (and copy to host) while the consumer writes this one
        return ordered_map(lambda it, dev: encode(it, dev).cpu().numpy(), items, devices, costs, depth,
                           threaded=True)
    return _rank_stream(items, encode, nbytes, costs, group, devices, depth)


def _rank_stream(items: Sequence[T], encode: Callable[[T, str], Any], nbytes: Callable[[T], int],
                 costs: Sequence[float], group: Group, devices: Sequence[str], depth: int) -> Iterator[Any]:
    """The distributed :func:`ordered_stream` of one rank."""
    owners = partition(costs, group.world)
    mine = [i for i, o in enumerate(owners) if o == group.rank]
    own_costs = [costs[i] for i in mine]
    on_main = group.is_main
    local = ordered_map(lambda i, dev: _host(encode(items[i], dev)) if on_main else encode(items[i], dev), mine,
                        devices, own_costs, depth, threaded=True)
    try:
        if group.is_main:
            for item, o in zip(items, owners, strict=True):
                yield next(local) if o == 0 else group.recv_bytes(o, nbytes(item))
            return
        try:
            for data in local:
                group.send_bytes(data, 0)
        except DistributedError:
            raise
        except BaseException as exc:
            with contextlib.suppress(DistributedError):
                group.send_error(exc, 0)
            raise
    finally:
        local.close()


def shares_files(group: Group, environ: dict[str, str] | None = None) -> bool:
    """Whether every rank of ``group`` sees the same files (so all can write into one output file):
    ``QUANTFORGE_SHARED_FS=1``/``0`` decides; otherwise true when torchrun put all ranks on one node
    (``LOCAL_WORLD_SIZE == WORLD_SIZE``)."""
    env = os.environ if environ is None else environ
    forced = env.get(SHARED_FS_ENV, "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    return env.get("LOCAL_WORLD_SIZE") == str(group.world)


def raise_any(group: Group, failure: BaseException | None) -> None:
    """Collective: every rank says whether its part failed; if any did, every rank raises (a rank its own
    exception, the others the first failed rank's error with its type), so all ranks stop together."""
    if not group.distributed:
        if failure is not None:
            raise failure
        return
    mine = None
    if failure is not None:
        kind = type(failure).__name__ if isinstance(failure, QuantforgeError) else "DistributedError"
        text = str(failure) if isinstance(failure, QuantforgeError) else f"{type(failure).__name__}: {failure}"
        mine = json.dumps({"type": kind, "message": text}).encode()
    reports = group.all_gather_object(mine)
    if failure is not None:
        raise failure
    for src, raw in enumerate(reports):
        if raw is not None:
            raise _remote_error(src, raw)


def _host(data: Any) -> Any:
    """``data`` (a uint8 tensor) as a host numpy array."""
    return data.cpu().numpy()


def drain(stream: Iterable[Any]) -> None:
    """Run a stream to its end, dropping what it yields (what the non-writing ranks do with ``ordered_stream``)."""
    for _ in stream:
        pass
