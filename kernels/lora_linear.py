"""LoRA linear over a frozen quantized base weight: ``y = x W^T + s (x A^T) B^T (+ bias)``.

``W`` is a :class:`~.qweight.QuantWeight` in any registry format; ``A`` is ``(r, in)``, ``B`` ``(out, r)``.
Gradients flow to ``x``, ``A``, ``B`` and the bias, never to ``W``. A 16-bit copy of ``W`` lives at most for
the duration of one forward or backward call (the transient path), never across calls.

Paths, same signature and values up to accumulation order:

* :func:`lora_linear_reference`: PyTorch autograd over ``W.dequantize()`` (the definition the tests hold the
  kernels to).
* fused (Triton): the base tile is dequantized in registers inside the matmul (:mod:`.tiles`), ``x A^T`` is
  accumulated in the same pass over ``x`` and ``(x A^T) B^T`` added in the epilogue. The backward is one fused
  pass over ``dy`` giving ``dx = dy W + s (dy B) A`` and ``dy B``, then two thin GEMMs for ``dA`` and ``dB``.
* transient: dequantize ``W`` into a buffer (:func:`.tiles.dequantize`: whole-tensor kernels for NF4/FP4 and
  Q4_K/Q5_K/Q6_K at ~3 TB/s on an H200), call cuBLAS, free it; re-dequantize in the backward. The LoRA terms
  are thin GEMMs beside it.

:func:`lora_linear` picks the fused path below :data:`TRANSIENT_MIN_M` tokens on CUDA and the transient path
from there on: the fused kernel dequantizes every weight tile once per row tile of ``x``, which costs more than
one dequantization to a buffer as soon as there are a few row tiles (benchmarks/kernels.py --sweep-only, H200:
fused 2.6 ms vs transient 0.25 ms forward on the 4096x4096 NF4 q projection at 2048 tokens; at 16 tokens both
are bound by launch overhead). Under ``TRITON_INTERPRET=1`` on CPU the fused kernels always run (how the tests
check them); without Triton the transient path runs on the codecs.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedFormat
from ..formats import Family
from . import tiles
from ._triton import HAVE_TRITON, interpreting, tl, triton, triton_available
from .qweight import QuantWeight, compute_copy

#: Token count (rows of x) from which CUDA calls take the transient path (dequantize to a buffer + cuBLAS).
#: Measured on an H200: at 16 tokens the fused forward+backward was as fast or faster (q: 0.87 vs 1.15 ms,
#: gate: 0.90 vs 0.91 ms), at 128 tokens slower on the gate shape (1.49 vs 1.12 ms).
TRANSIENT_MIN_M = 64


def _check(x: torch.Tensor, weight: QuantWeight, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
           lora_x: torch.Tensor | None) -> None:
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise UnsupportedFormat(f"x has {x.shape[-1]} features, the weight expects {in_f}")
    if (lora_a is None) != (lora_b is None):
        raise UnsupportedFormat("lora_a and lora_b go together: pass both or neither")
    if lora_a is not None:
        if lora_a.dim() != 2 or lora_a.shape[1] != in_f or lora_b.dim() != 2 or lora_b.shape != (
                out_f, lora_a.shape[0]):
            raise UnsupportedFormat(
                f"expected lora_a (r, {in_f}) and lora_b ({out_f}, r), got {tuple(lora_a.shape)} and "
                f"{tuple(lora_b.shape)}")
    if lora_x is not None and lora_x.shape != x.shape:
        raise UnsupportedFormat(f"lora_x must have the shape of x {tuple(x.shape)}, got {tuple(lora_x.shape)}")


def lora_linear_reference(x: torch.Tensor, weight: QuantWeight, lora_a: torch.Tensor | None,
                          lora_b: torch.Tensor | None, scale: float, bias: torch.Tensor | None = None,
                          lora_x: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch definition: dequantize ``W`` to ``x.dtype``, then ``F.linear``; autograd gives the gradients."""
    _check(x, weight, lora_a, lora_b, lora_x)
    y = torch.nn.functional.linear(x, weight.dequantize(x.dtype).to(x.device))
    if lora_a is not None:
        lx = x if lora_x is None else lora_x
        xa = torch.nn.functional.linear(lx, lora_a.to(x.dtype))
        y = y + scale * torch.nn.functional.linear(xa, lora_b.to(x.dtype))
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


def _save(ctx, weight: QuantWeight, scale: float, *tensors: torch.Tensor | None) -> None:
    """Keep what both backwards need: x, lora_x, A, B, bias and x A^T (never a copy of the base weight)."""
    ctx.weight, ctx.scale, ctx.has_lora_x = weight, scale, tensors[1] is not None
    ctx.save_for_backward(*tensors)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float, like: torch.Tensor) -> torch.Tensor:
    """``scale * a @ b`` in ``like``'s dtype (``like`` has the result's shape); the scale is applied in the GEMM's
    epilogue (one launch) when the dtypes agree."""
    if like.dtype == a.dtype:
        return torch.addmm(like, a, b, beta=0, alpha=scale)
    return torch.mm(a, b).mul_(scale).to(like.dtype)


def _grads(ctx, saved: tuple, dy2: torch.Tensor, dx: torch.Tensor | None, g: torch.Tensor | None) -> tuple:
    """The gradient tuple of either backward, given the saved tensors, ``dx`` and ``g = dy B``:
    ``dA = s g^T lx``, ``dB = s dy^T xa``, ``d lora_x = s g A`` when the LoRA input is separate, and the bias
    gradient."""
    x, lora_x, lora_a, lora_b, bias, xa = saved
    needs = ctx.needs_input_grad
    dlx = da = db = dbias = None
    if g is not None:
        if needs[3]:
            db = _scaled_mm(dy2.t(), xa, ctx.scale, lora_b)
        if needs[2]:
            lx2 = (x if lora_x is None else lora_x).reshape(-1, x.shape[-1])
            da = _scaled_mm(g.t(), lx2, ctx.scale, lora_a)
        if ctx.has_lora_x and needs[1]:
            dlx = torch.mm(g, lora_a.to(x.dtype)).mul_(ctx.scale).reshape(x.shape)
    if bias is not None and needs[4]:
        dbias = dy2.sum(0).to(bias.dtype)
    dx = dx.reshape(x.shape) if dx is not None and needs[0] else None
    return dx, dlx, da, db, dbias, None, None


def _dequant(weight: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """Transient ``(out, in)`` copy of the base weight: the Triton dequantize kernel on CUDA, the codec elsewhere."""
    fmt = weight.format
    if weight.data.is_cuda and fmt.family is not Family.FLOAT and triton_available():
        return tiles.dequantize(fmt, weight.data, dtype, aux=weight.extra.get("aux"),
                                double_quant=weight.double_quant)
    return compute_copy(weight, dtype)


class _TransientLoraLinear(torch.autograd.Function):
    """Dequantize-to-buffer + cuBLAS forward and backward; saves ``x``, ``lora_x`` and ``x A^T`` only.

    The base GEMM is issued first, right after the dequantization, so the GPU runs it while the host issues the
    thin LoRA GEMMs (an eager step is bound by the host's launch cost below a few thousand tokens); the LoRA
    terms enter ``y`` and ``dx`` in place (``addmm_``), in float32 inside the GEMM epilogue.
    """

    @staticmethod
    def forward(ctx, x, lora_x, lora_a, lora_b, bias, weight: QuantWeight, scale: float):
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.mm(x2, _dequant(weight, x.dtype).t())
        xa = None
        if lora_a is not None:
            lx2 = x2 if lora_x is None else lora_x.reshape(x2.shape)
            xa = torch.mm(lx2, lora_a.to(x.dtype).t())
            y.addmm_(xa, lora_b.to(x.dtype).t(), alpha=scale)
        if bias is not None:
            y.add_(bias.to(x.dtype))
        _save(ctx, weight, scale, x, lora_x, lora_a, lora_b, bias, xa)
        return y.view(*x.shape[:-1], y.shape[1])

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        x, lora_a, lora_b = saved[0], saved[2], saved[3]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        dx = torch.mm(dy2, _dequant(ctx.weight, x.dtype)) if ctx.needs_input_grad[0] else None
        g = None
        if lora_a is not None:
            g = torch.mm(dy2, lora_b.to(x.dtype))
            if dx is not None and not ctx.has_lora_x:
                dx.addmm_(g, lora_a.to(x.dtype), alpha=ctx.scale)
        return _grads(ctx, saved, dy2, dx, g)


_DOT_PRECISION = {torch.bfloat16: "tf32", torch.float16: "tf32", torch.float32: "ieee"}
#: The one small tile used under the CPU interpreter (rows of x, rows of W, reduction).
INTERPRET_CONFIG = {"BM": 16, "BN": 32, "BK": 64}


def _configs() -> list:
    """Autotune candidates for Hopper, aimed at the few-token shapes the fused path serves (the dispatch sends
    many tokens to cuBLAS); one small config under the interpreter."""
    if interpreting():
        return [triton.Config({**INTERPRET_CONFIG, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    # One stage: the pipeliner would stage every gathered byte/scale load of the weight tile in shared memory.
    # (128, 128, 64) with 8 warps is left out: on an H200 with Triton 3.6 its backward computed wrong dx and g
    # (benchmarks/kernels.py --check-fused), and many tokens go to the transient path anyway.
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=1)
            for bm, bn, bk, w in ((16, 64, 128, 4), (32, 64, 128, 4), (64, 128, 64, 8))]

if HAVE_TRITON:

    @triton.jit
    def _tile_rows(M, C, R, BM: tl.constexpr, BC: tl.constexpr, RP: tl.constexpr, GROUP: tl.constexpr):
        """This program's int64 rows of x (``[BM]``) and output columns (``[BC]``), the rank lanes, their masks, and
        whether its columns are the first tile (that program writes the ``[M, R]`` side output). Row tiles are
        grouped so that neighbouring programs share weight tiles in L2."""
        n_m = tl.cdiv(M, BM)
        width = GROUP * tl.cdiv(C, BC)
        pid = tl.program_id(0)
        first = (pid // width) * GROUP
        size = tl.minimum(n_m - first, GROUP)
        col_tile = (pid % width) // size
        rows = ((first + (pid % width) % size) * BM + tl.arange(0, BM)).to(tl.int64)
        cols = (col_tile * BC + tl.arange(0, BC)).to(tl.int64)
        rr = tl.arange(0, RP)
        return rows, cols, rr, rows < M, cols < C, rr < R, col_tile == 0

    @triton.jit
    def _mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """``acc + a @ b`` in float32; ``UPCAST`` multiplies 16-bit operands as float32 (the CPU interpreter's
        16-bit ``tl.dot`` is wrong; the values are the same, 16-bit products being exact in float32)."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PREC)

    @triton.jit
    def _fwd_kernel(x, lx, w, aux, a, b, bias, y, xa_out, M, N, K, stride_w, R, scale, M_BUCKET,
                    TILE: tl.constexpr, HAS_LORA: tl.constexpr, SEP_LX: tl.constexpr, HAS_BIAS: tl.constexpr,
                    RP: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, GROUP_M: tl.constexpr):
        """``y = x W^T + s (lx A^T) B^T + bias`` for one ``[BM, BN]`` tile; the programs of the first column tile
        also writes ``lx A^T`` (``[M, R]``, for the backward)."""
        rm, rn, rr, mm, nm, rmask, first_cols = _tile_rows(M, N, R, BM, BN, RP, GROUP_M)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        xa = tl.zeros([BM, RP], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK).to(tl.int64)
            km = kk < K
            xmask = mm[:, None] & km[None, :]
            xt = tl.load(x + rm[:, None] * K + kk[None, :], mask=xmask, other=0.0)
            wt = TILE(w, aux, rn[:, None], kk[None, :], stride_w, nm[:, None] & km[None, :])
            acc = _mma(xt, tl.trans(wt.to(xt.dtype, fp_downcast_rounding="rtne")), acc, PREC, UPCAST)
            if HAS_LORA:
                at = tl.load(a + rr[:, None] * K + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
                if SEP_LX:
                    lxt = tl.load(lx + rm[:, None] * K + kk[None, :], mask=xmask, other=0.0)
                else:
                    lxt = xt
                xa = _mma(lxt, tl.trans(at.to(xt.dtype)), xa, PREC, UPCAST)
        if HAS_LORA:
            xa_r = xa.to(y.dtype.element_ty)
            bt = tl.load(b + rn[:, None] * R + rr[None, :], mask=nm[:, None] & rmask[None, :], other=0.0)
            acc += scale * _mma(xa_r, tl.trans(bt.to(xa_r.dtype)), tl.zeros([BM, BN], dtype=tl.float32), PREC, UPCAST)
            if first_cols:
                tl.store(xa_out + rm[:, None] * R + rr[None, :], xa_r, mask=mm[:, None] & rmask[None, :])
        if HAS_BIAS:
            acc += tl.load(bias + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
        tl.store(y + rm[:, None] * N + rn[None, :], acc.to(y.dtype.element_ty), mask=mm[:, None] & nm[None, :])

    @triton.jit
    def _bwd_kernel(dy, w, aux, a, b, dx, g_out, M, N, K, stride_w, R, scale, M_BUCKET,
                    TILE: tl.constexpr, HAS_LORA: tl.constexpr, ADD_LORA: tl.constexpr, RP: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GROUP_M: tl.constexpr):
        """One pass over ``dy`` for a ``[BM, BN]`` tile of ``dx`` (``BN`` columns of the input features, ``BK`` the
        reduction over output features): ``dx = dy W (+ s (dy B) A)``; the programs of the first column tile write
        ``g = dy B`` (``[M, R]``)."""
        rm, rk, rr, mm, km, rmask, first_cols = _tile_rows(M, K, R, BM, BN, RP, GROUP_M)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        g = tl.zeros([BM, RP], dtype=tl.float32)
        for n0 in range(0, N, BK):
            nn = n0 + tl.arange(0, BK).to(tl.int64)
            nm = nn < N
            dyt = tl.load(dy + rm[:, None] * N + nn[None, :], mask=mm[:, None] & nm[None, :], other=0.0)
            wt = TILE(w, aux, nn[:, None], rk[None, :], stride_w, nm[:, None] & km[None, :])
            acc = _mma(dyt, wt.to(dyt.dtype, fp_downcast_rounding="rtne"), acc, PREC, UPCAST)
            if HAS_LORA:
                bt = tl.load(b + nn[:, None] * R + rr[None, :], mask=nm[:, None] & rmask[None, :], other=0.0)
                g = _mma(dyt, bt.to(dyt.dtype), g, PREC, UPCAST)
        if HAS_LORA:
            g_r = g.to(dx.dtype.element_ty)
            if first_cols:
                tl.store(g_out + rm[:, None] * R + rr[None, :], g_r, mask=mm[:, None] & rmask[None, :])
            if ADD_LORA:
                at = tl.load(a + rr[:, None] * K + rk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
                acc += scale * _mma(g_r, at.to(g_r.dtype), tl.zeros([BM, BN], dtype=tl.float32), PREC, UPCAST)
        tl.store(dx + rm[:, None] * K + rk[None, :], acc.to(dx.dtype.element_ty), mask=mm[:, None] & km[None, :])

    _KEY = ["M_BUCKET", "N", "K", "HAS_LORA"]
    _fwd = triton.autotune(configs=_configs(), key=_KEY)(_fwd_kernel)
    _bwd = triton.autotune(configs=_configs(), key=_KEY)(_bwd_kernel)


def _outputs(src2: torch.Tensor, cols: int, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, int]:
    """The ``(M, cols)`` result, the ``(M, r)`` LoRA side output (or None), contiguous A and B (``src2`` stands in
    for absent pointers) and the rank, for a launch over rows of ``src2``."""
    rank = 0 if lora_a is None else lora_a.shape[0]
    out = torch.empty((src2.shape[0], cols), dtype=src2.dtype, device=src2.device)
    side = None if lora_a is None else torch.empty((src2.shape[0], rank), dtype=src2.dtype, device=src2.device)
    a = src2 if lora_a is None else lora_a.contiguous()
    b = src2 if lora_b is None else lora_b.contiguous()
    return out, side, a, b, rank


def _weight_meta(weight: QuantWeight, dtype: torch.dtype, rank: int) -> tuple[tuple, dict]:
    """Kernel arguments of the base weight (storage, aux pointer, row stride) and the shared constexprs."""
    data = weight.data
    meta = {"TILE": tiles.load_tile(weight.format, weight.double_quant), "RP": max(16, triton.next_power_of_2(rank)),
            "PREC": _DOT_PRECISION[dtype], "UPCAST": interpreting()}
    return (data, weight.extra.get("aux", data), data.stride(0)), meta


def _grid(rows: int, cols: int):
    return lambda meta: (triton.cdiv(rows, meta["BM"]) * triton.cdiv(cols, meta["BN"]),)


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


def fused_forward(x2: torch.Tensor, lx2: torch.Tensor | None, weight: QuantWeight, lora_a: torch.Tensor | None,
                  lora_b: torch.Tensor | None, bias: torch.Tensor | None, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused forward on 2-D contiguous ``x2`` ``(M, K)``; returns ``y`` ``(M, N)`` and ``lx A^T``."""
    (M, K), N = x2.shape, weight.shape[0]
    y, xa, a, b, rank = _outputs(x2, N, lora_a, lora_b)
    (data, aux, stride_w), meta = _weight_meta(weight, x2.dtype, rank)
    _fwd[_grid(M, N)](x2, x2 if lx2 is None else lx2, data, aux, a, b, x2 if bias is None else bias, y,
                      y if xa is None else xa, M, N, K, stride_w, rank, scale, _m_bucket(M),
                      HAS_LORA=lora_a is not None, SEP_LX=lx2 is not None, HAS_BIAS=bias is not None, **meta)
    return y, xa


def fused_backward_dx(dy2: torch.Tensor, weight: QuantWeight, lora_a: torch.Tensor | None,
                      lora_b: torch.Tensor | None, scale: float, add_lora: bool
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pass over ``dy2`` ``(M, N)``: ``dx = dy W (+ s (dy B) A when add_lora)`` and ``g = dy B``."""
    (M, N), K = dy2.shape, weight.shape[1]
    dx, g, a, b, rank = _outputs(dy2, K, lora_a, lora_b)
    (data, aux, stride_w), meta = _weight_meta(weight, dy2.dtype, rank)
    _bwd[_grid(M, K)](dy2, data, aux, a, b, dx, dx if g is None else g, M, N, K, stride_w, rank, scale,
                      _m_bucket(M), HAS_LORA=lora_a is not None, ADD_LORA=add_lora, **meta)
    return dx, g


class _FusedLoraLinear(torch.autograd.Function):
    """Fused Triton forward and backward; saves ``x``, ``lora_x`` and ``x A^T`` only (never a copy of ``W``)."""

    @staticmethod
    def forward(ctx, x, lora_x, lora_a, lora_b, bias, weight: QuantWeight, scale: float):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        lx2 = None if lora_x is None else lora_x.reshape(x2.shape).contiguous()
        y, xa = fused_forward(x2, lx2, weight, lora_a, lora_b, bias, scale)
        _save(ctx, weight, scale, x, lora_x, lora_a, lora_b, bias, xa)
        return y.reshape(*lead, -1)

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        x, lora_a, lora_b = saved[0], saved[2], saved[3]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype).contiguous()
        dx, g = fused_backward_dx(dy2, ctx.weight, lora_a, lora_b, ctx.scale,
                                  lora_a is not None and not ctx.has_lora_x)
        return _grads(ctx, saved, dy2, dx, g)


def lora_linear(x: torch.Tensor, weight: QuantWeight, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
                scale: float, bias: torch.Tensor | None = None, lora_x: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W^T + scale (lora_x A^T) B^T (+ bias)``; ``lora_x`` (LoRA dropout applied by the caller) defaults to x.

    ``x`` ``(..., in)``, ``lora_a`` ``(r, in)``, ``lora_b`` ``(out, r)``; ``lora_a``/``lora_b`` None gives a plain
    quantized linear. Gradients flow to ``x``, ``lora_x``, ``lora_a``, ``lora_b`` and ``bias``.
    """
    _check(x, weight, lora_a, lora_b, lora_x)
    if weight.device != x.device:
        raise UnsupportedFormat(f"weight is on {weight.device}, x on {x.device}; move the weight with .to()")
    if use_fused(x, weight):
        return _FusedLoraLinear.apply(x, lora_x, lora_a, lora_b, bias, weight, float(scale))
    return _TransientLoraLinear.apply(x, lora_x, lora_a, lora_b, bias, weight, float(scale))


def use_fused(x: torch.Tensor, weight: QuantWeight) -> bool:
    """The dispatch rule: fused Triton kernels for few tokens on CUDA, always under the CPU interpreter."""
    if not triton_available() or x.dtype not in _DOT_PRECISION:
        return False
    if x.device.type == "cuda":
        return x.numel() // x.shape[-1] < TRANSIENT_MIN_M
    return interpreting()
