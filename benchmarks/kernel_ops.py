"""GPU: the training-block kernels against their plain PyTorch versions, forward+backward, in one run.

    python benchmarks/kernel_ops.py [--no-compile] [--tokens 8192]

Per op: forward and forward+backward median time (``triton.testing.do_bench``), peak memory of one
forward+backward above the inputs, and the largest relative error (``||a - b|| / ||b||`` over the output and every
gradient) against the eager PyTorch version, which is the anchor of each ratio. Shapes are Llama-3.1-8B's, bf16:

* RMSNorm: x (tokens, 4096), weight trained too; eager = transformers' LlamaRMSNorm formula.
* RoPE: q (tokens, 32, 128), k (tokens, 8, 128), Llama-3 scaled frequencies, 4 packed sequences; eager =
  transformers' ``apply_rotary_pos_emb`` with cos/sin computed once outside the timed region (as a model shares
  them across layers).
* cross-entropy: hidden (tokens, 4096), lm_head (128256, 4096) frozen (LoRA) and trained, 5% ignored labels;
  eager = full logits, ``.float()``, ``F.cross_entropy``.
* MLP block (SwiGLU): gate/up (14336, 4096), down (4096, 14336), NF4 (double quant) base via QuantWeight, LoRA
  r=16 on all three; eager = the Triton tile dequantizer + ``F.linear`` + LoRA under autograd (the
  bitsandbytes + PEFT recipe); also the same block over an unquantized bf16 base, for scale.

Then one correctness and memory check of ``offloaded_checkpoint`` on CUDA against no checkpointing.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
import traceback
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# The script's folder holds a kernels.py, which would shadow Hugging Face's `kernels` package that transformers
# probes for on import: take the folder off the path and load the shared helpers by file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.util.spec_from_file_location("_bench_common", _HERE / "_common.py")
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)
table = _common.table

T0 = time.perf_counter()
COMPILE_BUDGET_S = 60.0  # torch.compile variants are skipped once the run has used this much wall time


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def max_rel(outs, refs) -> float:
    return max(rel(a, b) for a, b in zip(outs, refs, strict=True) if b is not None)


def timed(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def peak_mib(fn) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def measure(rows, op, variant, forward, leaves, grad_outputs, anchor=None):
    """Time ``forward()`` and forward+backward to ``leaves``; return (outputs, grads) for the error check."""
    import torch

    def fwd_bwd():
        outs = forward()
        outs = outs if isinstance(outs, tuple) else (outs,)
        return outs, torch.autograd.grad(outs, leaves, grad_outputs)

    with torch.no_grad():
        t_fwd = timed(forward)
    t_all = timed(fwd_bwd)
    mem = peak_mib(fwd_bwd)
    outs, grads = fwd_bwd()
    result = [o.detach() for o in outs] + list(grads)
    err = "anchor" if anchor is None else f"{max_rel(result, anchor[0]):.1e}"
    ratio = "1.00" if anchor is None else f"{anchor[1] / t_all:.2f}x"
    mem_ratio = "1.00" if anchor is None else f"{mem / anchor[2]:.2f}"
    rows.append([op, variant, t_fwd, t_all, ratio, f"{mem:.0f}", mem_ratio, err])
    print(f"  {op:14s} {variant:42s} fwd {t_fwd:8.3f} ms  fwd+bwd {t_all:8.3f} ms  peak {mem:8.0f} MiB  err {err}",  # noqa: T201
          flush=True)
    return result, t_all, mem


def compiled_ok(use_compile: bool) -> bool:
    return use_compile and time.perf_counter() - T0 < COMPILE_BUDGET_S


def bench_rmsnorm(rows, n, use_compile):
    import torch
    from quantforge.kernels.rmsnorm import rms_norm

    x = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(4096, device="cuda")).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn_like(x)

    def eager(x, w):  # transformers' LlamaRMSNorm.forward
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return w * h.to(x.dtype)

    anchor = measure(rows, "RMSNorm", "eager PyTorch (LlamaRMSNorm)", lambda: eager(x, w), (x, w), (dy,))
    if compiled_ok(use_compile):
        comp = torch.compile(eager, dynamic=False)
        measure(rows, "RMSNorm", "torch.compile", lambda: comp(x, w), (x, w), (dy,), anchor)
    measure(rows, "RMSNorm", "quantforge rms_norm (Triton)", lambda: rms_norm(x, w, 1e-5), (x, w), (dy,), anchor)


def bench_rope(rows, n, use_compile):
    import torch
    from quantforge.kernels.rope import apply_rope, default_inv_freq
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=131072,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    emb = LlamaRotaryEmbedding(cfg).to("cuda")
    if not emb.inv_freq[-1] < default_inv_freq(128, 500000.0, "cuda")[-1] / 7:
        raise RuntimeError("transformers did not apply Llama-3 rope scaling; check the config keys")
    pos = torch.arange(n // 4, device="cuda").repeat(4)
    q0 = torch.randn(n, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k0 = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dq, dk = torch.randn_like(q0), torch.randn_like(k0)
    cos, sin = emb(q0, pos[None])

    def eager():  # q, k come out of a projection in a model: the clone stands for that (in both variants)
        q, k = apply_rotary_pos_emb(q0.clone()[None], k0.clone()[None], cos, sin, unsqueeze_dim=2)
        return q[0], k[0]

    anchor = measure(rows, "RoPE", "eager PyTorch (HF apply_rotary_pos_emb)", eager, (q0, k0), (dq, dk))
    if compiled_ok(use_compile):
        comp = torch.compile(eager, dynamic=False)
        measure(rows, "RoPE", "torch.compile", comp, (q0, k0), (dq, dk), anchor)

    def ours():
        return apply_rope(q0.clone(), k0.clone(), pos, inv_freq=emb.inv_freq, attention_scaling=emb.attention_scaling)

    measure(rows, "RoPE", "quantforge apply_rope (Triton, in place)", ours, (q0, k0), (dq, dk), anchor)


def bench_cross_entropy(rows, n):  # no torch.compile variant: compiling it alone would outrun the budget
    import torch
    from quantforge.kernels.cross_entropy import chunked_cross_entropy

    V = 128256
    hidden = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    head = (0.02 * torch.randn(V, 4096, device="cuda")).to(torch.bfloat16)
    labels = torch.randint(0, V, (n,), device="cuda")
    labels[torch.rand(n, device="cuda") < 0.05] = -100
    one = torch.ones((), device="cuda")

    def eager(h, w):
        return torch.nn.functional.cross_entropy((h @ w.t()).float(), labels, ignore_index=-100)

    for trained in (False, True):
        head.requires_grad_(trained)
        leaves = (hidden, head) if trained else (hidden,)
        op = "CE head trained" if trained else "CE head frozen"
        anchor = measure(rows, op, "eager PyTorch (full fp32 logits)", lambda: eager(hidden, head), leaves, (one,))
        measure(rows, op, "quantforge chunked_cross_entropy", lambda: chunked_cross_entropy(hidden, head, labels),
                leaves, (one,), anchor)
        del anchor
    head.requires_grad_(False)


def bench_mlp(rows, n):
    import torch
    import torch.nn.functional as F
    from quantforge.kernels.mlp import LoraProjection, lora_mlp
    from quantforge.kernels.qweight import QuantWeight
    from quantforge.kernels.tiles import dequantize

    H, INTER, R = 4096, 14336, 16
    g = torch.Generator(device="cuda").manual_seed(0)

    def proj(out_f, in_f, fmt):
        w = (torch.randn(out_f, in_f, device="cuda", generator=g) / math.sqrt(in_f)).to(torch.bfloat16)
        a = (torch.randn(R, in_f, device="cuda", generator=g) / math.sqrt(in_f)).to(torch.bfloat16)
        b = (0.01 * torch.randn(out_f, R, device="cuda", generator=g)).to(torch.bfloat16)
        return LoraProjection(QuantWeight.quantize(w, fmt), a.requires_grad_(True), b.requires_grad_(True), 2.0)

    def eager_linear(x, p):  # what bitsandbytes + PEFT do: a dequantize kernel, cuBLAS, the LoRA path beside it
        qw = p.weight
        w = qw.data if qw.fmt == "bf16" else dequantize(qw.format, qw.data, torch.bfloat16,
                                                          aux=qw.extra.get("aux"), double_quant=qw.double_quant)
        return F.linear(x, w) + p.scale * F.linear(F.linear(x, p.lora_a), p.lora_b)

    def eager(x, gate, up, down):
        return eager_linear(F.silu(eager_linear(x, gate)) * eager_linear(x, up), down)

    x = torch.randn(n, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)

    def case(fmt):
        projs = [proj(INTER, H, fmt), proj(INTER, H, fmt), proj(H, INTER, fmt)]
        leaves = (x, *[t for p in projs for t in (p.lora_a, p.lora_b)])
        op = f"MLP {fmt} base r=16"
        dq = "dequantize kernel + " if fmt != "bf16" else ""
        anchor = measure(rows, op, f"eager PyTorch ({dq}F.linear + LoRA)", lambda: eager(x, *projs), leaves, (dy,))
        measure(rows, op, "quantforge lora_mlp (saves x only)", lambda: lora_mlp(x, *projs), leaves, (dy,), anchor)
        mib = sum(p.weight.nbytes for p in projs) / 2 ** 20
        print(f"  {op}: base weights {mib:.0f} MiB", flush=True)  # noqa: T201

    case("nf4")
    case("bf16")


def check_offload(n):
    """Four residual layers: gradients and peak memory with offloaded checkpointing vs none."""
    import torch
    from quantforge.kernels.offload import offloaded_checkpoint

    ws = [(0.02 * torch.randn(4096, 4096, device="cuda")).to(torch.bfloat16).requires_grad_(True)
          for _ in range(8)]

    def layer(h, i):
        return h + torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(h, ws[2 * i])),
                                              ws[2 * i + 1])

    x = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = {}
    for mode in ("none", "offload"):
        for t in (x, *ws):
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        h = x
        for i in range(4):
            h = layer(h, i) if mode == "none" else offloaded_checkpoint(layer, h, i)
        h.float().square().mean().backward()
        torch.cuda.synchronize()
        out[mode] = ([t.grad.clone() for t in (x, *ws)], (torch.cuda.max_memory_allocated() - base) / 2 ** 20,
                     1000 * (time.perf_counter() - t0))
    err = max_rel(out["offload"][0], out["none"][0])
    print(f"offloaded_checkpoint, 4 layers of x ({n}, 4096): max grad rel err vs no checkpointing {err:.1e}; "  # noqa: T201
          f"peak MiB none {out['none'][1]:.0f}, offload {out['offload'][1]:.0f}; "
          f"wall ms (one step, cold) none {out['none'][2]:.1f}, offload {out['offload'][2]:.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = ap.parse_args()
    import torch
    import triton

    if not torch.cuda.is_available():
        raise SystemExit("kernel_ops.py measures CUDA kernels; no GPU is visible")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "  # noqa: T201
          f"tokens {args.tokens}", flush=True)
    rows: list[list[object]] = []
    failed = []
    sections = [("rmsnorm", lambda: bench_rmsnorm(rows, args.tokens, not args.no_compile)),
                ("rope", lambda: bench_rope(rows, args.tokens, not args.no_compile)),
                ("cross_entropy", lambda: bench_cross_entropy(rows, args.tokens)),
                ("mlp", lambda: bench_mlp(rows, args.tokens)),
                ("offload", lambda: check_offload(args.tokens))]
    for name, run in sections:  # one section failing still leaves the others' numbers
        print(f"[{time.perf_counter() - T0:5.1f} s] {name}", flush=True)  # noqa: T201
        try:
            run()
        except Exception:
            traceback.print_exc()
            failed.append(name)
        torch.cuda.empty_cache()
    print(f"\ntotal wall {time.perf_counter() - T0:.0f} s\n")  # noqa: T201
    print(table(["op", "variant", "fwd ms", "fwd+bwd ms", "speedup vs eager", "peak MiB (fwd+bwd)",  # noqa: T201
                 "memory vs eager", "max rel err vs eager"], rows))
    if failed:
        raise SystemExit(f"failed sections: {', '.join(failed)}")


if __name__ == "__main__":
    main()
