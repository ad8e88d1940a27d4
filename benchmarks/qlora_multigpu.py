"""QLoRA training on several GPUs: tokens/s on one GPU against N GPUs at the same global batch (data parallel and
FSDP2), and peak memory per GPU with FSDP2 against data parallel.

Model: the Llama-3.1-8B shape of ``qlora.py`` (hidden 4096, 32 layers, MLP 14336, 32/8 heads, Llama-3 RoPE,
vocab 49152), random bf16 weights written once to ``--workdir``, NF4 with double quantization, LoRA r=16
alpha=16 on all seven projections, torch AdamW (the optimizer FSDP2 shards), gradient checkpointing, packed
fixed-length examples of 2048 tokens (the same on every rank).

    torchrun --standalone --nproc_per_node 2 benchmarks/qlora_multigpu.py --assets .bench/qlora --workdir /tmp/qlora
    torchrun --standalone --nproc_per_node 4 benchmarks/qlora_multigpu.py --assets .bench/qlora --workdir /tmp/qlora

Every rank runs this script. An optimizer step is ``--grad-accum`` (default: the number of GPUs) micro-batches of
``--batch-tokens`` tokens in every phase, so the phases train on the same global batches and should print the same
losses (to bf16 rounding):

1. one GPU: rank 0 alone, as a one-process run (the other ranks wait at a barrier): the anchor;
2. data parallel on every GPU (what ``torchrun ... quantforge train`` does): a whole model per GPU, LoRA gradients
   all-reduced once per step;
3. FSDP2 on every GPU (``--shard``): base weights, LoRA and AdamW states sharded, each layer sharded as it loads.

Prints one table: tokens/s, speed-up over one GPU (goals: >= 1.85x on 2 GPUs, >= 3.6x on 4), peak GiB per GPU
(largest over the ranks) and the FSDP2 / data-parallel memory ratio. ``--record`` appends it to RESULTS.md.

A functional check of the script on CPU processes (gloo), with a small random Llama instead of the 8B shape::

    torchrun --standalone --nproc_per_node 2 benchmarks/qlora_multigpu.py --small --device cpu --batch-tokens 1024
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (see the device notes)

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
from _common import record, table  # noqa: E402
from qlora import LLAMA8B, SEQ, fixed_examples, write_model  # noqa: E402

# benchmarks/kernels.py would shadow the 'kernels' package transformers imports: drop this folder from the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

GOALS = {2: 1.85, 4: 3.6}


def log(group: Any, msg: str) -> None:
    if group.is_main:
        print(msg, flush=True)


SMALL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             num_hidden_layers=2, vocab_size=512, max_position_embeddings=4096)


def free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def write_small(out: Path) -> Path:
    """A small random Llama (CPU functional check of the script)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**SMALL), dtype=torch.float32).save_pretrained(out)
    return out


def load(path: Path, device: str, on_layer: Any = None) -> Any:
    from quantforge.train import LoraSpec, load_model

    return load_model(path, lora=LoraSpec(rank=16, alpha=16.0), base_format="nf4", device=device,
                      dtype="bf16" if device == "cuda" else "f32", on_layer=on_layer)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def phase(model: Any, par: Any, cfg: Any, examples: list, warmup: int, steps: int) -> dict:
    """``warmup`` then ``steps`` timed optimizer steps through the trainer's own step on this rank's share;
    tokens/s of the whole job (global tokens over the slowest rank's time), this rank's peak GiB, the losses."""
    import torch
    from quantforge.train.loop import Trainer

    model.train()
    tr = Trainer(model, examples, [], cfg, par)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for s in range(warmup):
        tr.step(s)
    sync()
    par.group.barrier()
    t0 = time.perf_counter()
    tokens, losses = 0, []
    for s in range(warmup, warmup + steps):
        rec = tr.step(s)
        tokens += rec["tokens"]
        losses.append(rec["loss"])
    sync()
    par.group.barrier()
    seconds = time.perf_counter() - t0
    del tr
    return {"tps": tokens / seconds, "peak": peak_gib(), "losses": losses, "seconds": seconds}


def _gib(peaks: list) -> str:
    return " / ".join("-" if p is None else f"{p:.1f}" for p in peaks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=".bench/qlora", help="folder with smollm2/ tokenizer files (as qlora.py)")
    ap.add_argument("--workdir", default="/tmp/qlora")
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quick functional check")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="tokens per micro-batch (4 x 2048)")
    ap.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default: number of GPUs)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip-fsdp", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: gloo processes (with --small: a functional check)")
    ap.add_argument("--small", action="store_true", help="a small random Llama instead of the 8B shape")
    ap.add_argument("--json", default=None)
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()

    import torch
    from quantforge.train import TrainConfig, init_distributed, layer_sharder
    from quantforge.train.distributed import Parallel, setup

    from quantforge import distributed

    group = init_distributed(args.device)
    world = group.world
    accum = args.grad_accum or world
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU process"
    log(group, f"device: {world} x {name}, torch {torch.__version__}")
    shape = SMALL if args.small else {**LLAMA8B, "num_hidden_layers": args.layers}
    path = Path(args.workdir) / ("small-llama" if args.small else f"llama8b-shape-{args.layers}")
    if group.is_main and not (path / "config.json").is_file():
        t0 = time.perf_counter()
        write_small(path) if args.small else write_model(path, shape, Path(args.assets))
        log(group, f"wrote the checkpoint in {time.perf_counter() - t0:.0f}s")
    group.barrier()
    seq = min(SEQ, args.batch_tokens)
    per_step = accum * (args.batch_tokens // seq)
    examples = fixed_examples(per_step * (args.warmup + args.steps), seq, shape["vocab_size"])
    cfg = TrainConfig(batch_tokens=args.batch_tokens, grad_accum=accum, max_seq_len=seq, optimizer="adamw", lr=1e-4,
                      max_steps=args.warmup + args.steps, eval_split=0.0)
    results: dict[str, dict] = {}

    one = None
    if group.is_main:
        with distributed.single_process():
            t0 = time.perf_counter()
            model = load(path, args.device)
            loaded = time.perf_counter() - t0
            one = phase(model, Parallel(), cfg, examples, args.warmup, args.steps)
            one["load_s"] = loaded
            del model
            free()
    one = group.broadcast_object(one)
    results["one GPU"] = {**one, "gpus": 1, "peaks": [one["peak"]]}
    log(group, f"one GPU: {results['one GPU']['tps']:,.0f} tok/s")
    if world > 1:
        modes = [("data parallel", False)] + ([] if args.skip_fsdp else [("FSDP2 --shard", True)])
        for label, shard in modes:
            group.barrier()
            t0 = time.perf_counter()
            model = load(path, args.device, layer_sharder(cfg.gradient_checkpointing) if shard else None)
            par = setup(model, cfg, shard, group)
            loaded = time.perf_counter() - t0
            res = phase(model, par, cfg, examples, args.warmup, args.steps)
            res.update({"gpus": world, "load_s": loaded, "peaks": group.all_gather_object(res["peak"])})
            results[label] = res
            log(group, f"{label}: {res['tps']:,.0f} tok/s, peak per GPU {_gib(res['peaks'])} GiB")
            del model, par
            free()

    if group.is_main:
        base = results["one GPU"]
        ddp = results.get("data parallel")
        rows = []
        for label, r in results.items():
            speedup = r["tps"] / base["tps"]
            goal = f">= {GOALS[r['gpus']]}x" if r["gpus"] in GOALS else "-"
            mem = f"{max(r['peaks']) / max(ddp['peaks']):.2f}x" if ddp and None not in r["peaks"] else "-"
            drift = max(abs(a - b) / b for a, b in zip(r["losses"], base["losses"], strict=True))
            rows.append([label, r["gpus"], f"{r['tps']:,.0f}", f"{speedup:.2f}x", goal,
                         _gib(r["peaks"]), mem, f"{drift:.2e}", f"{r['load_s']:.0f}"])
        model_name = "small random Llama" if args.small else f"Llama-3.1-8B shape, {args.layers} layers"
        body = (f"{model_name}, NF4 (double quant), LoRA r=16 on all seven projections, "
                f"torch AdamW, gradient checkpointing; a step = {accum} x {args.batch_tokens} tokens "
                f"({per_step} examples of {seq}) in every row; {args.steps} timed steps after {args.warmup}.\n\n"
                + table(["setup", "GPUs", "tokens/s", "vs one GPU", "goal", "peak GiB per GPU", "vs data parallel",
                         "max loss rel. diff vs one GPU", "load s"], rows))
        print("\n" + body, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        if args.record:
            cmd = f"torchrun --standalone --nproc_per_node {world} benchmarks/qlora_multigpu.py " + " ".join(
                sys.argv[1:])
            record("QLoRA on several GPUs", cmd, f"{world} x {name}, {os.cpu_count()} CPU cores", body)
    group.barrier()
    if group.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
