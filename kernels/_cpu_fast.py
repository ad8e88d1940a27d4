"""Fast CPU quantizers: C loops (``kernels/_cquant.c``) that give the same bytes as the PyTorch reference codecs.

The reference codecs (``q*.py``, ``iq4_*.py``, built on :mod:`._search`) run every search as a chain of PyTorch ops
over all groups at once. The C extension ``quantforge.kernels._cquant`` runs the same searches as plain loops: per
chunk of groups (sub-blocks or blocks), the data is laid out position-major ``(n, G)`` like the reference's
transposed layout, and every loop runs over the ``G`` groups innermost, so each group's float32 sums stay strictly
sequential (``((0 + t0) + t1) + ...``, as in ggml's C loops) while the compiler vectorizes across groups. Decisions
are the reference's, op for op:

- float32 arithmetic throughout, in the reference's operation order (built with ``-ffp-contract=off`` and without
  fast-math: no FMA contraction, no reassociation); ``nearest_int`` is ``(v + 1.5*2^23) - 1.5*2^23`` (round half
  to even, exact for |v| < 2^22 and clamped afterwards everywhere it matters); divisions are real divisions where
  the reference divides;
- candidates replace the running best only when strictly better, in the reference's order;
- fp16 conversion is round-to-nearest-even on the bit pattern (``f16_bits`` in the C file), and ``d``/``dmin`` are
  rounded through fp16 before the re-quantization pass.

:func:`quantize` is the entry point; the codecs' ``quantize`` functions call it for CPU tensors unless
``QUANTFORGE_CPU_KERNELS=torch`` (or the extension was not built), so the PyTorch code stays the reference (and the
CUDA path). The library is opened with :mod:`ctypes` on first use (a few milliseconds, no compile step); ctypes
releases the GIL during each call, so rows are split over ``torch.get_num_threads()`` worker threads.

The bytes equal the reference's wherever the searches' float32 sums stay finite (weights up to ~1e11, and any
small magnitude down to subnormals). Beyond ~1e12 some sums overflow to inf/NaN; the reference and llama.cpp
already disagree there, and these kernels then mostly follow llama.cpp and never index out of range.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import InputError, UnsupportedFormat

ENV = "QUANTFORGE_CPU_KERNELS"
"""``torch`` selects the PyTorch reference on CPU; anything else (default ``c``) the C kernels."""

TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs")
"""The types the C kernels encode; a name's index is its type id in ``qf_quantize_rows``."""

EXTENSION = "quantforge.kernels._cquant"
ABI_VERSION = 2
"""``qf_abi_version()`` of the C file this module was written for (a stale build is not used)."""

_TYPE_INFO = {  # name -> (block size, type size)
    "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
    "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210),
    "iq4_nl": (32, 18), "iq4_xs": (256, 136),
}

PARALLEL_MIN_ELEMENTS = {"q8_0": 1 << 18, "q4_0": 1 << 18, "q4_1": 1 << 18, "q5_0": 1 << 18, "q5_1": 1 << 18}
"""Tensors with fewer weights than this (by type; 1 << 14 for the searching types) run on the calling thread
alone: below it, handing work to another thread costs about as much as it saves. The legacy types count only
without an imatrix (their ref quantizers are one pass)."""
_SEARCH_MIN_ELEMENTS = 1 << 14

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {  # entry point -> (restype, argtypes)
    "qf_abi_version": (ctypes.c_int, ()),
    "qf_quantize_rows": (ctypes.c_int, (ctypes.c_int, _P, _I64, _P, _P, _I64, _I64)),
    "qf_widen_f32": (_I64, (_P, _P, _I64, ctypes.c_int)),
    "qf_count_nonfinite": (_I64, (_P, _I64)),
    "qf_f16_bits": (None, (_P, _P, _I64)),
    "qf_f16_values": (None, (_P, _P, _I64)),
}


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """Open the built extension with ctypes and type its entry points: ``(library, None)``, or ``(None, why not)``
    when it was not built, does not load, or is stale."""
    try:
        spec = importlib.util.find_spec(EXTENSION)
    except ImportError as e:  # pragma: no cover - a broken package install
        return None, f"{EXTENSION}: {e}"
    if spec is None or not spec.origin:
        return None, f"{EXTENSION} was not built (no C compiler at install time?)"
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:
        return None, f"{spec.origin} does not load: {e}"
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is None:
            return None, f"{spec.origin} lacks {name} (a stale build?)"
        fn.restype, fn.argtypes = restype, argtypes
    if lib.qf_abi_version() != ABI_VERSION:
        return None, f"{spec.origin} has ABI {lib.qf_abi_version()}, expected {ABI_VERSION} (a stale build?)"
    return lib, None


def load_error() -> str | None:
    """Why the C library cannot be used, or None when it loaded."""
    return _load()[1]


def library() -> ctypes.CDLL | None:
    """The loaded C library with its entry points typed, or None (a one-time warning says why)."""
    lib, err = _load()
    if lib is None:
        _warn_once(err)
    return lib


@functools.cache
def _warn_once(err: str) -> None:
    """One RuntimeWarning per process (and reason) that the CPU codecs fall back to the reference."""
    warnings.warn(f"quantforge's C quantizers are unavailable, using the slower PyTorch reference on CPU: {err}. "
                  "Reinstall quantforge with a C compiler (gcc or clang) present to build them.",
                  RuntimeWarning, stacklevel=4)


def enabled(weight: torch.Tensor) -> bool:
    """Whether the C path quantizes ``weight``: a CPU tensor, the library loaded, and not switched off by
    ``QUANTFORGE_CPU_KERNELS=torch``."""
    if weight.device.type != "cpu" or os.environ.get(ENV, "c").lower() == "torch":
        return False
    return library() is not None


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _pool(size: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``size`` worker threads (ctypes calls release the GIL)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < size:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(size, thread_name_prefix="quantforge-cpu")
            _POOL_SIZE = size
        return _POOL


def _run_rows(type_id: int, x: torch.Tensor, n: int, qw: torch.Tensor | None, out: torch.Tensor, r0: int,
              r1: int) -> int:
    """Quantize rows ``r0 .. r1`` of the contiguous float32 ``x`` (``n`` per row) into ``out``; returns 1 when an
    IQ4_NL block scale is not finite, else 0."""
    qw_ptr = None if qw is None else qw.data_ptr()
    return library().qf_quantize_rows(type_id, x.data_ptr(), n, qw_ptr, out.data_ptr(), r0, r1)


def _workers(name: str, rows: int, n: int, has_imatrix: bool) -> int:
    """How many threads share the rows: ``torch.get_num_threads()``, or 1 for small tensors (see
    :data:`PARALLEL_MIN_ELEMENTS`)."""
    one_pass = name == "q8_0" or (not has_imatrix and name in PARALLEL_MIN_ELEMENTS)
    min_elems = PARALLEL_MIN_ELEMENTS[name] if one_pass else _SEARCH_MIN_ELEMENTS
    if rows * n < min_elems:
        return 1
    return max(1, min(torch.get_num_threads(), rows))


def _run_split(type_id: int, x: torch.Tensor, n: int, qw: torch.Tensor | None, out: torch.Tensor, rows: int,
               workers: int) -> int:
    """Rows in ``workers`` contiguous shares: the calling thread takes the first, the pool the others."""
    if workers <= 1:
        return _run_rows(type_id, x, n, qw, out, 0, rows)
    step = -(-rows // workers)
    parts = [(r, min(rows, r + step)) for r in range(0, rows, step)]
    pool = _pool(len(parts) - 1)
    futures = [pool.submit(_run_rows, type_id, x, n, qw, out, a, b) for a, b in parts[1:]]
    bad = _run_rows(type_id, x, n, qw, out, *parts[0])
    return max([bad] + [f.result() for f in futures])


def _as_f32(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor as a C-contiguous float32 tensor (no copy when it already is one)."""
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _check_shapes(name: str, weight: torch.Tensor, imatrix: torch.Tensor | None) -> None:
    """The C loops index without bounds checks: refuse shapes they would read or write past (the codecs validate
    with friendlier messages before calling :func:`quantize`)."""
    bs = _TYPE_INFO[name][0]
    if weight.dim() != 2 or weight.shape[1] == 0 or weight.shape[1] % bs:
        raise UnsupportedFormat(f"{name} needs a 2-D weight whose rows are a multiple of {bs} long, got shape "
                                f"{tuple(weight.shape)}; pad the rows or pick a format with smaller blocks")
    if imatrix is not None and imatrix.numel() != weight.shape[1]:
        raise UnsupportedFormat(f"imatrix must have one value per column ({weight.shape[1]}), got shape "
                                f"{tuple(imatrix.shape)}")


def quantize(name: str, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows, n)`` float CPU tensor -> ``(rows, n / block * type_size)`` uint8, the same bytes as the reference
    codec ``name`` (:func:`enabled` must be true). ``imatrix`` ``(n,)`` is ignored by Q8_0.

    Raises :class:`~quantforge.errors.InputError` where the reference does (an IQ4_NL block scale that is not
    finite, where llama.cpp would store NaN), and :class:`~quantforge.errors.UnsupportedFormat` for shapes that do
    not fit the blocks."""
    _check_shapes(name, weight, imatrix)
    bs, ts = _TYPE_INFO[name]
    rows, n = weight.shape
    x = _as_f32(weight)
    qw = _as_f32(imatrix) if imatrix is not None and name != "q8_0" else None
    if library() is None:
        raise RuntimeError(f"the C quantizers are not loaded ({load_error()}); check enabled() first")
    out = torch.empty((rows, n // bs * ts), dtype=torch.uint8)
    if _run_split(TYPES.index(name), x, n, qw, out, rows, _workers(name, rows, n, qw is not None)):
        raise InputError(
            "IQ4_NL scale search gave a non-finite block scale (non-finite weights, or an imatrix that is zero over "
            "a whole 32-column block, where llama.cpp stores NaN and fails validation); give every column a "
            "positive imatrix value or quantize without the imatrix"
        )
    return out


def to_float32(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A CPU tensor's values as a contiguous float32 tensor, and how many of them are NaN/Inf, in one pass without
    the GIL for bf16 / fp16 / float32 (the exporter's per-chunk load-convert-check; other dtypes go through
    torch). :func:`library` must have loaded."""
    lib = library()
    t = t.detach().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        out = torch.empty(t.shape, dtype=torch.float32)
        bad = lib.qf_widen_f32(t.data_ptr(), out.data_ptr(), t.numel(), int(t.dtype == torch.bfloat16))
        return out, int(bad)
    out = t.to(torch.float32).contiguous()
    return out, int(lib.qf_count_nonfinite(out.data_ptr(), out.numel()))


def f16_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> fp16 bit patterns (int16 tensor) through the C kernels' conversion (for tests)."""
    x = _as_f32(x)
    out = torch.empty(x.shape, dtype=torch.int16)
    library().qf_f16_bits(x.data_ptr(), out.data_ptr(), x.numel())
    return out


def f16_values(h: torch.Tensor) -> torch.Tensor:
    """fp16 bit patterns (int16 tensor) -> float32 through the C kernels' conversion (for tests)."""
    h = h.detach().to(device="cpu", dtype=torch.int16).contiguous()
    out = torch.empty(h.shape, dtype=torch.float32)
    library().qf_f16_values(h.data_ptr(), out.data_ptr(), h.numel())
    return out


IQ_KINDS = {"iq2_xxs": 0, "iq2_xs": 1, "iq3_xxs": 2, "iq1_s": 3, "iq1_m": 4, "iq3_s": 5, "iq2_s": 6}
"""The lattice i-quants the C kernels encode (``qf_iq_encode_rows``), by kind id. Their lattice tables are built
in Python (:func:`quantforge.kernels._iq_grids.search_tables`, plus :func:`lane_tables`) and handed to C."""

IQ_LANES = 16
"""Neighbours per step of the C neighbour search (``IQ_LANES`` in ``_cquant.c``)."""

_LANE_TABLES: dict[int, tuple] = {}
_LANE_LOCK = threading.Lock()


def _build_lane_tables(t) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`lane_tables`."""
    dim, bits = t.dim, t.bits
    base = 3 if dim == 8 else 8  # levels per position the searches round to (kmax of every kind of this dim)
    nb = t.neighbours
    rows, width = nb.shape
    levels = ((t.coords - 1.0) * 0.5).to(torch.int64)
    if int(levels.max()) >= base or bits * dim > 16 or t.coords.shape[0] > 1 << 16:
        raise RuntimeError(f"lattice tables of dim {dim} do not fit the C search's 16-bit point words")
    words = (levels << (bits * torch.arange(dim))).sum(dim=1)
    cnt = (nb >= 0).sum(dim=1)
    chunks = -(-width // IQ_LANES)
    ids = torch.zeros((rows, chunks * IQ_LANES), dtype=torch.int64)
    ids[:, :width] = nb.clamp(min=0)
    steps = torch.stack([words[ids], ids], dim=1).reshape(rows, 2, chunks, IQ_LANES).transpose(1, 2)
    used = -(-cnt // IQ_LANES)
    size = 1 + used * 2 * IQ_LANES
    off = torch.cumsum(size, 0) - size
    lanes = torch.empty(int(size.sum()), dtype=torch.int64)
    lanes[off] = cnt
    body = torch.ones(lanes.numel(), dtype=torch.bool)
    body[off] = False
    lanes[body] = steps[torch.arange(chunks)[None, :] < used[:, None]].reshape(-1)
    digits = (torch.arange(base**dim)[:, None] // base ** torch.arange(dim)) % base
    sparse = (digits << (bits * torch.arange(dim))).sum(dim=1)
    point, row = t.map[sparse], t.row[sparse]
    if not bool(((point >= 0) | (row >= 0)).all()):
        raise RuntimeError("lattice tables lack the neighbours of a key the C search can reach")
    code = torch.where(point >= 0, point, -(off[row.clamp(min=0)] + 1)).to(torch.int32)
    return code.contiguous(), lanes.to(torch.int32).to(torch.int16).contiguous()


def lane_tables(tables) -> tuple[torch.Tensor, torch.Tensor]:
    """The search tables of ``tables`` (a CPU ``SearchTables``) in the layout of the C search: ``(code, lanes)``.

    ``code`` (int32): per dense key ``sum(level_i * base**i)`` (base 3 for the dim 8 lattices, 8 for the dim 4
    ones, the levels the searches round to), the key's lattice point, or ``-(offset + 1)`` of its neighbour block
    in ``lanes``. ``lanes`` (16-bit words): per block the neighbour count, then per :data:`IQ_LANES` neighbours
    (in the reference's order, the last step padded with point 0) their points' level words (level ``i`` at bit
    ``bits * i``) and their point indices. Small (under 1.5 MB) and built once per table set (tens of ms)."""
    with _LANE_LOCK:
        hit = _LANE_TABLES.get(id(tables))
        if hit is None or hit[0] is not tables:
            hit = (tables, *_build_lane_tables(tables))
            _LANE_TABLES[id(tables)] = hit
    return hit[1], hit[2]


@functools.cache
def _iq_entry():
    """``qf_iq_encode_rows`` typed, or None when the library is absent or was built before it existed."""
    lib = library()
    fn = None if lib is None else getattr(lib, "qf_iq_encode_rows", None)
    if fn is not None:
        fn.restype = ctypes.c_int
        fn.argtypes = (ctypes.c_int, _P, _I64, _P, _P, _I64, _I64, _P, _P, _P, _P, _P)
    return fn


def iq_enabled(weight: torch.Tensor) -> bool:
    """Whether :func:`encode_iq` runs for ``weight`` (:func:`enabled`, and the library has the i-quant entry)."""
    return enabled(weight) and _iq_entry() is not None


def encode_iq(name: str, tables, x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor) -> None:
    """Encode float32 rows ``x`` ``(rows, n)`` as i-quant ``name`` into the contiguous uint8 ``out`` (the rows'
    super-blocks), the same bytes as the reference codec. The worker threads take rows one at a time from a shared
    counter, so a thread slowed down by other work on the machine leaves its rows to the others."""
    fn = _iq_entry()
    x = _as_f32(x)
    rows, n = x.shape
    qw_ptr = None if qw is None else qw.data_ptr()
    code, lanes = lane_tables(tables)
    args = (tables.coords.data_ptr(), tables.map.data_ptr(), code.data_ptr(), lanes.data_ptr())
    workers = 1 if rows * n < _SEARCH_MIN_ELEMENTS else max(1, min(torch.get_num_threads(), rows))
    counter = ctypes.c_int64(0)
    next_row = ctypes.addressof(counter) if workers > 1 else None

    def run() -> int:
        return fn(IQ_KINDS[name], x.data_ptr(), n, qw_ptr, out.data_ptr(), 0, rows, *args, next_row)

    futures = [_pool(workers - 1).submit(run) for _ in range(workers - 1)]
    bad = [run()] + [f.result() for f in futures]
    if any(bad):
        raise RuntimeError(f"qf_iq_encode_rows rejected {name} (kind {IQ_KINDS[name]})")
