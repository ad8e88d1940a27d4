"""Pieces shared by the K-quant codecs (Q2_K ... Q6_K): row chunking, fp16 rounding, bit packing, and the
Q4_K/Q5_K search (the two differ only in the code range and the search constants).

Layout conventions used by the codecs (GGUF.md §1-2):
- a chunk of rows becomes ``x`` ``(S, 256)`` float32, one row per super-block;
- the searches run on the transposed sub-block layout ``(sub_len, G)`` with ``G = S * n_sub`` groups
  (see :mod:`._search`), and codes come back as ``(S, 256)`` int32 before packing.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import UnsupportedFormat
from ..formats import QuantFormat
from . import _cpu_fast
from ._blocks import as_blocks, as_byte_blocks
from ._search import cdiv, qkx_search_t, qp_search_t, seqsum, sqrt_f32

CHUNK_ELEMENTS = 1 << 19
"""On CPU, rows are quantized in chunks of about this many weights so the search temporaries stay cache-sized."""
DEVICE_CHUNK_ELEMENTS = 1 << 26
"""On a GPU, chunks are as large as memory comfortably allows (each torch op is a kernel launch)."""

PARALLEL_MIN_ELEMENTS = 1 << 17
"""CPU tensors smaller than this are quantized on the calling thread alone."""

Encoder = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _row_chunks(rows: int, n: int, on_cpu: bool, workers: int) -> list[tuple[int, int]]:
    """Split ``rows`` into near-equal chunks of at most about the chunk size; for ``workers > 1`` and enough
    weights, a multiple of ``workers`` of them so the threads get equal shares."""
    if rows == 0:
        return []
    limit = CHUNK_ELEMENTS if on_cpu else DEVICE_CHUNK_ELEMENTS
    count = min(rows, -(-rows * n // limit))
    if workers > 1 and rows * n >= PARALLEL_MIN_ELEMENTS:
        count = min(rows, -(-count // workers) * workers)
    step = -(-rows // count)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _single_thread_worker() -> None:
    torch.set_num_threads(1)


def quantize_rows(
    weight: torch.Tensor, imatrix: torch.Tensor | None, fmt: QuantFormat, encode: Encoder
) -> torch.Tensor:
    """Validate ``weight`` ``(rows, n)`` / ``imatrix`` ``(n,)`` and run ``encode`` on row chunks.

    ``encode(x, qw)`` gets super-blocks ``x`` ``(S, block)`` float32 and the matching importance ``qw`` (same
    shape, or None) and returns packed ``(S, type_size)`` uint8.

    On CPU with ``torch.get_num_threads() > 1`` the chunks run on that many worker threads, each with
    single-threaded ops: the searches are long chains of medium-sized ops whose Python dispatch would otherwise
    serialize (PyTorch releases the GIL inside each op). Call ``torch.set_num_threads(1)`` to keep it serial.

    CPU tensors go to the C kernels of :mod:`._cpu_fast` (same bytes) unless ``QUANTFORGE_CPU_KERNELS=torch``;
    ``encode`` is then the reference.
    """
    as_blocks(weight[:1], fmt.block_size)
    rows, n = weight.shape
    if imatrix is not None:
        if imatrix.dim() != 1 or imatrix.shape[0] != n:
            raise UnsupportedFormat(
                f"imatrix for {fmt.name} must have one value per column ({n},), got shape {tuple(imatrix.shape)}; "
                "pass the entry for this tensor (per-expert slices for 3-D tensors)"
            )
        imatrix = imatrix.to(device=weight.device, dtype=torch.float32)
    if fmt.name in _cpu_fast.TYPES and _cpu_fast.enabled(weight):
        return _cpu_fast.quantize(fmt.name, weight, imatrix)
    out = torch.empty((rows, fmt.nbytes((1, n))), dtype=torch.uint8, device=weight.device)
    on_cpu = weight.device.type == "cpu"
    threads = torch.get_num_threads() if on_cpu else 1
    chunks = _row_chunks(rows, n, on_cpu, threads)

    def run(chunk: tuple[int, int]) -> None:
        r0, r1 = chunk
        x = weight[r0:r1].to(torch.float32).reshape(-1, fmt.block_size)
        qw = None if imatrix is None else imatrix.expand(r1 - r0, n).reshape(-1, fmt.block_size)
        out[r0:r1] = encode(x, qw).reshape(r1 - r0, -1)

    workers = min(threads, len(chunks))
    if workers <= 1:
        for chunk in chunks:
            run(chunk)
        return out
    try:
        with ThreadPoolExecutor(workers, initializer=_single_thread_worker) as pool:
            list(pool.map(run, chunks))
    finally:
        torch.set_num_threads(threads)
    return out


def byte_blocks(data: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``(rows, nbytes)`` uint8 -> ``(n_blocks, type_size)`` int32 (for shift arithmetic)."""
    if data.dim() != 2:
        raise UnsupportedFormat(f"expected packed {fmt.name} bytes of shape (rows, nbytes), got {tuple(data.shape)}")
    return as_byte_blocks(data, fmt.type_size).to(torch.int32)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> fp16 (round to nearest even) -> float32: ``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x))``."""
    return x.to(torch.float16).to(torch.float32)


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """``(S,)`` float -> ``(S, 2)`` int32 holding the little-endian fp16 bytes."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2).to(torch.int32)


def fp16_from(b: torch.Tensor) -> torch.Tensor:
    """``(S, 2)`` int bytes (little-endian fp16) -> ``(S,)`` float32."""
    return b.to(torch.uint8).contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def divc(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x / c`` as an exact IEEE division (CUDA divides by a scalar through its reciprocal)."""
    return x / torch.full_like(x, c)


def positive_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` where ``x > 0`` else +0.0 (a C running max that starts at 0)."""
    return torch.where(x > 0, x, torch.zeros_like(x))


def to_groups(x: torch.Tensor, sub: int) -> torch.Tensor:
    """``(S, 256)`` -> transposed sub-block layout ``(sub, S * 256 / sub)``."""
    return x.reshape(-1, sub).t().contiguous()


def from_groups(L: torch.Tensor, block: int) -> torch.Tensor:
    """Transposed sub-block layout ``(sub, G)`` -> ``(S, block)``."""
    return L.t().reshape(-1, block)


def block_sum_sq(x: torch.Tensor) -> torch.Tensor:
    """Sequential ``Σ x²`` over each super-block row of ``x`` ``(S, 256)`` -> ``(S,)``."""
    xt = x.t().contiguous()
    return seqsum(xt.mul_(xt))


def pack_crumbs(L: torch.Tensor) -> torch.Tensor:
    """2-bit codes ``(S, 256)`` -> ``(S, 64)``: byte ``32h + l`` holds element ``128h + 32c + l`` at bits ``2c``."""
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def unpack_crumbs(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_crumbs`: ``(S, 64)`` -> ``(S, 256)`` codes in 0..3."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=qs.device).view(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


def pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins ``(S, 8)`` -> the 12 packed bytes of Q4_K/Q5_K (GGUF.md §1)."""
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    return torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 15) | ((hi_m & 15) << 4)], dim=1)


def unpack_scales_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes ``(S, 12)`` -> ``(sc, m)`` each ``(S, 8)`` in 0..63."""
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 6) << 4)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 6) << 4)], dim=1)
    return sc, mn


def requant_asym(xs: torch.Tensor, L: torch.Tensor, dj: torch.Tensor, mj: torch.Tensor, nmax: int) -> torch.Tensor:
    """Codes ``clamp(nearest((x + m_j) / d_j), 0, nmax)`` on the transposed layout; ``d_j == 0`` keeps ``L``."""
    new = torch.add(xs, mj).div_(dj).round_().clamp_(0, nmax).to(torch.int32)
    return torch.where(dj != 0, new, L)


def requant_sym(xs: torch.Tensor, L: torch.Tensor, dj: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Codes ``clamp(nearest(x / d_j), lo, hi) - lo`` on the transposed layout; groups with ``d_j == 0`` keep ``L``."""
    new = torch.div(xs, dj).round_().clamp_(lo, hi).sub_(lo).to(torch.int32)
    return torch.where(dj != 0, new, L)


Q45_IMATRIX_SEARCH = (-0.9, 0.05, 36)
"""``make_qkx3_quants``' (rmin, rdelta, nstep) in ``quantize_row_q{4,5}_K_impl`` (the imatrix path)."""


def q45_encode(
    x: torch.Tensor, qw: torch.Tensor | None, nmax: int, ref_search: tuple[float, float, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Q4_K/Q5_K search for super-blocks ``x`` ``(S, 256)`` (8 sub-blocks of 32, codes 0..nmax).

    Without ``qw`` this is ``quantize_row_q{4,5}_K_ref`` (weights ``av + |x|``, ``make_qkx2`` with ``ref_search``
    = (rmin, rdelta, nstep), 6-bit scales from the max); with ``qw`` it is ``quantize_row_q{4,5}_K_impl``
    (weights ``qw * sqrt(σ² + x²)``, ``make_qkx3``, ``make_qp_quants`` for the scales).
    Returns ``d``, ``dmin`` as fp16-rounded float32 ``(S,)``, packed scales ``(S, 12)`` and codes ``(S, 256)``.
    """
    S = x.shape[0]
    xs = to_groups(x, 32)
    if qw is None:
        av = sqrt_f32(divc(seqsum(xs * xs), 32.0))
        w = xs.abs().add_(av)
        rmin, rdelta, nstep = ref_search
        scale, the_min, L = qkx_search_t(xs, w, nmax, rmin, rdelta, nstep, False, strict_flat=True)
        max_scale = positive_or_zero(scale.view(S, 8).amax(dim=1))
        max_min = positive_or_zero(the_min.view(S, 8).amax(dim=1))
        inv_s = torch.where(max_scale > 0, cdiv(63.0, max_scale), torch.zeros_like(max_scale))
        inv_m = torch.where(max_min > 0, cdiv(63.0, max_min), torch.zeros_like(max_min))
        ls = ((scale.view(S, 8) * inv_s[:, None]).round_().to(torch.int32) & 255).clamp_(max=63)
        lm = ((the_min.view(S, 8) * inv_m[:, None]).round_().to(torch.int32) & 255).clamp_(max=63)
        d = fp16_round(divc(max_scale, 63.0))
        dmin = fp16_round(divc(max_min, 63.0))
    else:
        sigma2 = divc(block_sum_sq(x).mul_(2.0), 256.0)
        w = to_groups(sqrt_f32(torch.mul(x, x).add_(sigma2[:, None])).mul_(qw), 32)
        sw = seqsum(w)
        scale, the_min, L = qkx_search_t(xs, w, nmax, *Q45_IMATRIX_SEARCH, False, strict_flat=False)
        swt = sw.view(S, 8).t().contiguous()
        d_block, ls = qp_search_t(scale.view(S, 8).t().contiguous(), 63, swt)
        m_block, lm = qp_search_t(the_min.view(S, 8).t().contiguous(), 63, swt)
        ls, lm = ls.t() & 255, lm.t() & 255
        d, dmin = fp16_round(d_block), fp16_round(m_block)
    dj = (d[:, None] * ls.to(torch.float32)).reshape(-1)
    mj = (dmin[:, None] * lm.to(torch.float32)).reshape(-1)
    L = requant_asym(xs, L, dj, mj, nmax)
    return d, dmin, pack_scales_k4(ls, lm), from_groups(L, 256)


def q45_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K block bytes ``(S, type_size)`` int32 -> per-sub-block ``d*sc`` and ``dmin*m``, each ``(S, 8, 1)``."""
    d = fp16_from(b[:, 0:2])
    dmin = fp16_from(b[:, 2:4])
    sc, m = unpack_scales_k4(b[:, 4:16])
    return (d[:, None] * sc.to(torch.float32)).unsqueeze(-1), (dmin[:, None] * m.to(torch.float32)).unsqueeze(-1)
