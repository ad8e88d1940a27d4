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
"""The lattice i-quants the C kernels encode (``qf_quantize_iq_rows``), by kind id. Their lattice tables are built
in Python (:func:`quantforge.kernels._iq_grids.search_tables`) and handed to C."""


@functools.cache
def _iq_entry():
    """``qf_quantize_iq_rows`` typed, or None when the library is absent or was built before it existed."""
    lib = library()
    fn = None if lib is None else getattr(lib, "qf_quantize_iq_rows", None)
    if fn is not None:
        fn.restype = ctypes.c_int
        fn.argtypes = (ctypes.c_int, _P, _I64, _P, _P, _I64, _I64, _P, _P, _P, _P, _I64)
    return fn


def iq_enabled(weight: torch.Tensor) -> bool:
    """Whether :func:`encode_iq` runs for ``weight`` (:func:`enabled`, and the library has the i-quant entry)."""
    return enabled(weight) and _iq_entry() is not None


def encode_iq(name: str, tables, x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor) -> None:
    """Encode float32 rows ``x`` ``(rows, n)`` as i-quant ``name`` into the contiguous uint8 ``out`` (the rows'
    super-blocks), the same bytes as the reference codec; rows are shared over the worker threads."""
    fn = _iq_entry()
    x = _as_f32(x)
    rows, n = x.shape
    qw_ptr = None if qw is None else qw.data_ptr()
    args = (tables.coords.data_ptr(), tables.map.data_ptr(), tables.neighbours.data_ptr(), tables.row.data_ptr(),
            tables.neighbours.shape[1])

    def run(r0: int, r1: int) -> int:
        return fn(IQ_KINDS[name], x.data_ptr(), n, qw_ptr, out.data_ptr(), r0, r1, *args)

    workers = 1 if rows * n < _SEARCH_MIN_ELEMENTS else max(1, min(torch.get_num_threads(), rows))
    step = -(-rows // workers)
    parts = [(r, min(rows, r + step)) for r in range(0, rows, step)]
    futures = [_pool(len(parts) - 1).submit(run, a, b) for a, b in parts[1:]] if len(parts) > 1 else []
    bad = [run(*parts[0])] + [f.result() for f in futures]
    if any(bad):
        raise RuntimeError(f"qf_quantize_iq_rows rejected {name} (kind {IQ_KINDS[name]})")
