"""GPU benchmark of the LoRA linear over a quantized base (quantforge.kernels.lora_linear) on Llama-3.1-8B shapes.

For each projection (q, k, v, o, gate, up, down) at M = 2048 and 8192 tokens, rank 16, bf16 activations:

* ``bf16``: the anchor, a plain bf16 cuBLAS ``F.linear`` of the same shape (weight frozen: forward, and forward
  plus the input gradient);
* ``ours``: ``lora_linear`` as a user calls it (the dispatch picks the path), with gradients to x, A and B;
* ``bnb`` (NF4 rows): bitsandbytes ``matmul_4bit`` (``dequantize_4bit`` + matmul) plus PEFT-style LoRA
  ``lora_B(lora_A(x)) * scaling``, the same gradients.

Ratios are throughput relative to the anchor (anchor time / time; the goal is >= 0.8). A second table sweeps
the token count on the q and gate shapes with the fused Triton kernel and the transient (dequantize to a
buffer + cuBLAS) path forced, which is where the dispatch threshold comes from. Times are medians of
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs).

``--host`` prints the host (CPU) cost of each piece of one call on a tiny problem, a cProfile of one transient
forward+backward, and the standalone dequantize bandwidth of the whole-tensor kernels against the generic tile
kernel.

Run: ``python benchmarks/kernels.py [--formats nf4,q4_k,q6_k] [--tokens 2048,8192] [--rank 16]``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import torch

SHAPES = {  # name: (out_features, in_features) of Llama-3.1-8B
    "q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
    "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336),
}
SWEEP_TOKENS = (16, 128, 512, 2048)
SWEEP_SHAPES = ("q", "gate")


def bench(fn, grads: list[torch.Tensor] | None = None) -> float:
    """Median milliseconds of ``fn``."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, grad_to_none=grads, return_mode="median")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


class Case:
    """Inputs of one (shape, tokens) point; weights quantized once per shape and format."""

    def __init__(self, n: int, k: int, m: int, rank: int) -> None:
        g = torch.Generator(device="cuda").manual_seed(n * 7 + k + m)
        def rnd(*s, scale=1.0):
            return (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)
        self.x = rnd(m, k).requires_grad_()
        self.a = rnd(rank, k, scale=k ** -0.5).requires_grad_()
        self.b = rnd(n, rank, scale=0.02).requires_grad_()
        self.dy = rnd(m, n)
        self.scale = 2.0


def time_pair(forward, case: Case, grads: list[torch.Tensor]) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of ``forward()`` returning y."""
    with torch.no_grad():
        fwd = bench(forward)

    def step():
        forward().backward(case.dy)

    return fwd, bench(step, grads)


def linear_fn(x: torch.Tensor, w: torch.Tensor):
    return lambda: torch.nn.functional.linear(x, w)


def path_fn(fn, case: Case, qw):
    """A forced path (``_FusedLoraLinear`` or ``_TransientLoraLinear``) on the case's inputs."""
    return lambda: fn.apply(case.x, None, case.a, case.b, None, qw, case.scale)


def ours_fn(case: Case, qw, lora_linear):
    return lambda: lora_linear(case.x, qw, case.a, case.b, case.scale)


def bnb_fn(case: Case, packed, state):
    import bitsandbytes as bnb

    def f():
        y = bnb.matmul_4bit(case.x, packed.t(), quant_state=state)
        return y + torch.nn.functional.linear(torch.nn.functional.linear(case.x, case.a), case.b) * case.scale
    return f


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="nf4,q4_k,q6_k")
    p.add_argument("--tokens", default="2048,8192")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--sweep-only", action="store_true", help="only the token sweep of the fused and transient paths")
    p.add_argument("--profile", action="store_true", help="print a per-kernel breakdown of one q-shape step and exit")
    p.add_argument("--host", action="store_true",
                   help="print the host (CPU) cost of each piece of a call and the dequantize bandwidth, then exit")
    p.add_argument("--check-fused", action="store_true",
                   help="launch the fused kernels config by config (synchronizing after each), check them, exit")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from quantforge.kernels import lora_linear as ll
    from quantforge.kernels.qweight import QuantWeight

    formats = args.formats.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.profile:
        profile(formats, tokens[0], args.rank, ll, QuantWeight)
        return 0
    if args.host:
        host_costs(formats, args.rank, ll, QuantWeight)
        return 0
    if args.check_fused:
        check_fused(formats, args.rank, ll, QuantWeight)
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, rank {args.rank}, "
          f"transient from M >= {ll.TRANSIENT_MIN_M}", flush=True)
    rows, sweep = [], []
    for fmt in formats:
        for name, (n, k) in SHAPES.items():
            if args.sweep_only and name not in SWEEP_SHAPES:
                continue
            t0 = time.perf_counter()
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            qw = QuantWeight.quantize(w, fmt)
            bnb_w = None
            if fmt == "nf4":
                import bitsandbytes.functional as bnbf

                bnb_w = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            tq = time.perf_counter() - t0
            for m in [] if args.sweep_only else tokens:
                case = Case(n, k, m, args.rank)
                grads = [case.x, case.a, case.b]
                with torch.no_grad():
                    err = rel_err(ll.lora_linear(case.x, qw, case.a, case.b, case.scale),
                                  ll.lora_linear_reference(case.x.float(), qw, case.a.float(), case.b.float(),
                                                           case.scale))
                base = time_pair(linear_fn(case.x, w), case, [case.x])
                ours = time_pair(ours_fn(case, qw, ll.lora_linear), case, grads)
                theirs = time_pair(bnb_fn(case, *bnb_w), case, grads) if bnb_w is not None else None
                rows.append((fmt, name, m, base, ours, theirs, err))
                print(f"{fmt:5s} {name:5s} M={m:5d} bf16 {base[0]:.3f}/{base[1]:.3f} ours {ours[0]:.3f}/{ours[1]:.3f}"
                      + (f" bnb {theirs[0]:.3f}/{theirs[1]:.3f}" if theirs else "")
                      + f" err {err:.1e} (quantize {tq:.1f}s)", flush=True)
                del case
            if (args.sweep_only or not args.no_sweep) and name in SWEEP_SHAPES:
                sweep += sweep_tokens(fmt, name, w, qw, args.rank, ll)
            del w, qw, bnb_w
            torch.cuda.empty_cache()
    print_tables(rows, sweep)
    return 0


def sweep_tokens(fmt: str, name: str, w: torch.Tensor, qw, rank: int, ll) -> list[tuple]:
    """Forward and forward+backward ms of the forced fused and transient paths over token counts."""
    out = []
    n, k = w.shape
    for m in SWEEP_TOKENS:
        case = Case(n, k, m, rank)
        grads = [case.x, case.a, case.b]
        base = time_pair(linear_fn(case.x, w), case, [case.x])
        fused = time_pair(path_fn(ll._FusedLoraLinear, case, qw), case, grads)
        trans = time_pair(path_fn(ll._TransientLoraLinear, case, qw), case, grads)
        with torch.no_grad():
            err = rel_err(ll._FusedLoraLinear.apply(case.x, None, case.a, case.b, None, qw, case.scale),
                          ll.lora_linear_reference(case.x.float(), qw, case.a.float(), case.b.float(), case.scale))
        out.append((fmt, name, m, base, fused, trans, err))
        print(f"sweep {fmt} {name} M={m} bf16 {base} fused {fused} transient {trans} fused err {err:.1e}", flush=True)
    return out


def check_fused(formats: list[str], rank: int, ll, QuantWeight) -> None:
    """Each autotune config of the fused forward and backward kernels, launched alone on the q shape at M = 16,
    checked against the reference (a fault names its config: the launch is synchronized)."""
    n, k = SHAPES["q"]
    for fmt in formats:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qw = QuantWeight.quantize(w, fmt)
        case = Case(n, k, 16, rank)
        x = case.x.detach()
        y_ref = ll.lora_linear_reference(x.float(), qw, case.a.float(), case.b.float(), case.scale)
        dy = case.dy
        wf = qw.dequantize(torch.float32)
        g_ref = dy.float() @ case.b.float()
        dx_ref = dy.float() @ wf + case.scale * g_ref @ case.a.float()
        (data, aux, stride), wmeta = ll._weight_meta(qw, torch.bfloat16, rank)
        for cfg in ll._configs():
            meta = dict(cfg.kwargs)
            y = torch.empty(16, n, device="cuda", dtype=torch.bfloat16)
            xa = torch.empty(16, rank, device="cuda", dtype=torch.bfloat16)
            grid = (triton_cdiv(16, meta["BM"]) * triton_cdiv(n, meta["BN"]),)
            print(f"{fmt} fwd {meta} warps {cfg.num_warps}", end=" ", flush=True)
            ll._fwd_kernel[grid](x, x, data, aux, case.a.detach(), case.b.detach(), x, y, xa, 16, n, k, stride, rank,
                                 case.scale, 16, HAS_LORA=True, SEP_LX=False, HAS_BIAS=False, num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages, **wmeta, **meta)
            torch.cuda.synchronize()
            print(f"err {rel_err(y, y_ref):.1e}", flush=True)
            dx = torch.empty(16, k, device="cuda", dtype=torch.bfloat16)
            g = torch.empty(16, rank, device="cuda", dtype=torch.bfloat16)
            grid = (triton_cdiv(16, meta["BM"]) * triton_cdiv(k, meta["BN"]),)
            print(f"{fmt} bwd {meta} warps {cfg.num_warps}", end=" ", flush=True)
            ll._bwd_kernel[grid](dy, data, aux, case.a.detach(), case.b.detach(), dx, g, 16, n, k, stride, rank,
                                 case.scale, 16, HAS_LORA=True, ADD_LORA=True, num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages, **wmeta, **meta)
            torch.cuda.synchronize()
            print(f"err dx {rel_err(dx, dx_ref):.1e} g {rel_err(g, g_ref):.1e}", flush=True)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cpu_profile(fn) -> None:
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(14)


def train_step(fn, case: Case) -> None:
    fn().backward(case.dy)
    case.x.grad = case.a.grad = case.b.grad = None


def profile(formats: list[str], m: int, rank: int, ll, QuantWeight) -> None:
    """Standalone dequantize bandwidth, then CPU vs GPU time and the kernels of one q-shape forward+backward."""
    from quantforge.kernels import tiles

    for fmt in formats:
        w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
        qw = QuantWeight.quantize(w, fmt)
        aux = qw.extra.get("aux")
        ms = bench(functools.partial(tiles.dequantize, qw.format, qw.data, torch.bfloat16, aux=aux,
                                     double_quant=qw.double_quant))
        moved = qw.nbytes + w.numel() * 2
        print(f"dequantize {fmt} 14336x4096 -> bf16: {ms * 1e3:.1f} us, {moved / ms / 1e9:.2f} TB/s (packed + bf16)")
    n, k = SHAPES["q"]
    for fmt in formats:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        qw = QuantWeight.quantize(w, fmt)
        case = Case(n, k, m, rank)
        for label, fn in (("bf16", linear_fn(case.x, w)), ("ours", ours_fn(case, qw, ll.lora_linear))):
            step = functools.partial(train_step, fn, case)
            gpu = bench(step)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 20 * 1e3
            print(f"{fmt} q M={m} {label} f+b: do_bench {gpu:.3f} ms, back-to-back wall {wall:.3f} ms/step")
            if label == "ours" and fmt == formats[0]:
                cpu_profile(step)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))


def host_us(fn, n: int = 300) -> float:
    """Microseconds per call of ``fn`` issued back to back (GPU work kept tiny, so this is the host's cost)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def host_costs(formats: list[str], rank: int, ll, QuantWeight) -> None:
    """Host cost of the pieces of one LoRA linear call on tiny problems (GPU time negligible), a cProfile of one
    transient forward+backward, and the standalone dequantize bandwidth of the whole-tensor kernels against the
    generic per-element tile kernel (both checked bit for bit against the codec)."""
    from quantforge.kernels import tiles

    n, k, m = 256, 4096, 64
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    qw = QuantWeight.quantize(w, formats[0])
    case = Case(n, k, m, rank)
    x, a, b = case.x.detach(), case.a.detach(), case.b.detach()
    aux = qw.extra.get("aux")
    dq = functools.partial(tiles.dequantize, qw.format, qw.data, torch.bfloat16, aux=aux, double_quant=qw.double_quant)
    out = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
    n_blocks = n * k // qw.format.block_size
    kern, nb, consts = tiles._BLOCK_KERNELS["bnb4" if formats[0] in ("nf4", "fp4") else formats[0]]
    consts = {"DQ": int(qw.double_quant)} if formats[0] in ("nf4", "fp4") else consts
    grid = (triton_cdiv(n_blocks, nb),)

    def raw_launch():
        kern[grid](qw.data, aux if aux is not None else qw.data, out, n_blocks, NB=nb, **consts, enable_fp_fusion=False)

    def transient_fb():
        ll._TransientLoraLinear.apply(case.x, None, case.a, case.b, None, qw, case.scale).backward(case.dy)
        case.x.grad = case.a.grad = case.b.grad = None

    def fused_fb():
        c = small
        ll._FusedLoraLinear.apply(c.x, None, c.a, c.b, None, qw, c.scale).backward(c.dy)
        c.x.grad = c.a.grad = c.b.grad = None

    def anchor_fb():
        torch.nn.functional.linear(case.x, w).backward(case.dy)
        case.x.grad = None

    small = Case(n, k, 16, rank)
    pieces = [
        ("torch.empty (n, k) bf16", lambda: torch.empty(n, k, device="cuda", dtype=torch.bfloat16)),
        ("torch.mm x A^T (64 x 4096 x 16)", lambda: torch.mm(x, a.t())),
        ("Triton launch of the whole-tensor dequantize kernel", raw_launch),
        ("tiles.dequantize (checks + empty + launch)", dq),
        ("transient forward, no grad", lambda: ll._TransientLoraLinear.apply(x, None, a, b, None, qw, case.scale)),
        ("lora_linear forward, no grad (dispatch + transient)", lambda: ll.lora_linear(x, qw, a, b, case.scale)),
        ("transient forward+backward (grads to x, A, B)", transient_fb),
        ("fused forward+backward, 16 tokens", fused_fb),
        ("anchor F.linear forward+backward (grad to x)", anchor_fb),
    ]
    print(f"\nhost cost per call, {formats[0]} {n}x{k}, {m} tokens (GPU work negligible):")
    print("| piece | us per call |\n|---|---|")
    for label, fn in pieces:
        with torch.enable_grad() if "backward" in label else torch.no_grad():
            print(f"| {label} | {host_us(fn):.1f} |", flush=True)
    cpu_profile(transient_fb)
    print("\n| format | kernel | us | TB/s (packed + bf16) | equals codec |\n|---|---|---|---|---|")
    for fmt in formats:
        big = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
        q = QuantWeight.quantize(big, fmt)
        want = q.dequantize(torch.bfloat16)
        moved = q.nbytes + big.numel() * 2
        new = functools.partial(tiles.dequantize, q.format, q.data, torch.bfloat16, aux=q.extra.get("aux"),
                                double_quant=q.double_quant)
        res = torch.empty_like(want)

        def generic():
            br, bc = tiles.DEQUANT_TILE
            tiles.dequant_kernel[(triton_cdiv(14336, br), triton_cdiv(4096, bc))](
                q.data, q.extra.get("aux", q.data), res, 14336, 4096, q.data.shape[1],
                TILE=tiles.load_tile(q.format, q.double_quant), BR=br, BC=bc, enable_fp_fusion=False)
            return res

        for label, fn in (("whole-tensor", new), ("generic tile", generic)):
            ok = torch.equal(fn(), want)
            ms = bench(fn)
            print(f"| {fmt} | {label} | {ms * 1e3:.1f} | {moved / ms / 1e9:.2f} | {ok} |", flush=True)
        del big, want
        torch.cuda.empty_cache()


def print_tables(rows: list[tuple], sweep: list[tuple]) -> None:
    print("\n| base | proj | M | bf16 fwd ms | ours fwd ms | ours/bf16 fwd | bnb fwd ms | bf16 f+b ms | ours f+b ms "
          "| ours/bf16 f+b | bnb f+b ms | bnb/bf16 f+b | ours vs bnb f+b | rel err |")
    print("|" + "---|" * 14)
    for fmt, name, m, base, ours, theirs, err in rows:
        bnb_f = f"{theirs[0]:.3f}" if theirs else "-"
        bnb_b = f"{theirs[1]:.3f}" if theirs else "-"
        bnb_r = f"{base[1] / theirs[1]:.2f}x" if theirs else "-"
        vs = f"{theirs[1] / ours[1]:.2f}x" if theirs else "-"
        print(f"| {fmt} | {name} | {m} | {base[0]:.3f} | {ours[0]:.3f} | {base[0] / ours[0]:.2f}x | {bnb_f} | "
              f"{base[1]:.3f} | {ours[1]:.3f} | {base[1] / ours[1]:.2f}x | {bnb_b} | {bnb_r} | {vs} | {err:.1e} |")
    if rows:
        worst = min(min(b[0] / o[0], b[1] / o[1]) for _, _, _, b, o, _, _ in rows)
        print(f"\nworst ours/bf16 throughput ratio: {worst:.2f}x (goal >= 0.80x)")
    if sweep:
        print("\n| base | proj | M | bf16 fwd ms | fused fwd ms | transient fwd ms | bf16 f+b ms | fused f+b ms "
              "| transient f+b ms | fused rel err |")
        print("|" + "---|" * 10)
        for fmt, name, m, base, fused, trans, err in sweep:
            print(f"| {fmt} | {name} | {m} | {base[0]:.3f} | {fused[0]:.3f} | {trans[0]:.3f} | {base[1]:.3f} | "
                  f"{fused[1]:.3f} | {trans[1]:.3f} | {err:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
