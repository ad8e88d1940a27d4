"""QLoRA training speed and memory: quantforge's trainer against HF transformers + PEFT + bitsandbytes, same GPU,
same run, same checkpoint, plus a loss-curve comparison on the SmolLM2 shape.

Model: Llama-3.1-8B shape (hidden 4096, 32 layers, 32/8 heads, MLP 14336, Llama-3 RoPE scaling), vocab 49152
(SmolLM2 tokenizer), random bf16 weights written to disk as safetensors first, NF4 with double quantization, LoRA
r=16 alpha=16 on all seven projections, AdamW (torch), train mode, gradient checkpointing in both (ours: offloaded
to pinned CPU memory), SDPA in the reference; ours packs examples (FlashAttention varlen).

Usage (on the GPU machine)::

    python benchmarks/qlora.py --assets .bench/qlora --workdir /tmp/qlora [--layers 32] [--skip-reference]

``--gguf`` adds the trainer on the GGUF layout of the q4_k_m plan (``base_type: q4_k_m``: Q4_K for most
projections, Q6_K for the attn_v / ffn_down tensors llama.cpp's mix promotes, quantized on the GPU by the loader
as ``quantforge train --base-format gguf --plan`` does) against its NF4 path on the same checkpoint, steps, batches
and rank (timed runs of ``--steps`` x 8 / batch optimizer steps, so each run trains about the same tokens); the
GGUF comparison alone::

    python -P benchmarks/qlora.py --assets .bench/qlora --workdir /tmp/qlora --skip-curve --skip-speed --gguf \
        --batches 1 8 --gguf-profile 8 [--gguf-repeats 3]

Prints tables (tokens/s, peak GiB, ratios) and writes them to ``--json`` if given.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

SEQ = 2048
LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, rms_norm_eps=1e-5, vocab_size=49152, max_position_embeddings=131072,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
START = time.perf_counter()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg: str) -> None:
    print(msg, flush=True)


def write_model(out: Path, cfg: dict, assets: Path, seed: int = 0, std: float = 0.02) -> Path:
    """Random bf16 Llama checkpoint (one shard per layer) with the SmolLM2 tokenizer files."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    d, f, h, kv, hd = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                       cfg["num_key_value_heads"], cfg["head_dim"])
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * std).to(torch.bfloat16).cpu()

    weight_map = {}
    n_layers = cfg["num_hidden_layers"]
    for i in range(n_layers + 1):
        if i < n_layers:
            p = f"model.layers.{i}."
            t = {p + "self_attn.q_proj.weight": rnd(h * hd, d), p + "self_attn.k_proj.weight": rnd(kv * hd, d),
                 p + "self_attn.v_proj.weight": rnd(kv * hd, d), p + "self_attn.o_proj.weight": rnd(d, h * hd),
                 p + "mlp.gate_proj.weight": rnd(f, d), p + "mlp.up_proj.weight": rnd(f, d),
                 p + "mlp.down_proj.weight": rnd(d, f),
                 p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                 p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16)}
        else:
            t = {"model.embed_tokens.weight": rnd(cfg["vocab_size"], d), "model.norm.weight": torch.ones(
                d, dtype=torch.bfloat16)}
            if not cfg.get("tie_word_embeddings", False):
                t["lm_head.weight"] = rnd(cfg["vocab_size"], d)
        name = f"model-{i:05d}.safetensors"
        save_file(t, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    conf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 2, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": False, "dtype": "bfloat16", **cfg}
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    for fname in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        (out / fname).write_bytes((assets / "smollm2" / fname).read_bytes())
    return out


def reset_peak() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


# ----------------------------------------------------------------------------------------------------- ours
def ours_load(path: Path, fmt: str = "nf4", plan: Path | None = None):
    """The trainer's own loader: ``fmt`` uniform (NF4 double-quantized by default), or a gguf ``plan`` applied in
    memory on the GPU (``fmt="gguf"``), as ``quantforge train --base-format gguf --plan`` does."""
    from quantforge.train import LoraSpec, load_model

    return load_model(path, lora=LoraSpec(rank=16, alpha=16.0), base_format=fmt, plan=plan, device="cuda",
                      dtype="bf16")


def ours_run(model, examples, batch_tokens: int, steps: int, warmup: int = 1):
    """``steps`` timed optimizer steps (after ``warmup``) through the trainer's own step; (tokens/s, peak GiB,
    losses)."""
    from quantforge.train.config import TrainConfig
    from quantforge.train.loop import Trainer

    cfg = TrainConfig(batch_tokens=batch_tokens, max_seq_len=max(len(e) for e in examples),
                      max_steps=steps + warmup, optimizer="adamw", lr=1e-4, eval_split=0.0)
    model.train()
    tr = Trainer(model, examples, [], cfg)
    reset_peak()
    for s in range(warmup):
        tr.step(s)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = 0
    losses = []
    for s in range(warmup, warmup + steps):
        rec = tr.step(s)
        tokens += rec["tokens"]
        losses.append(rec["loss"])
    dt = time.perf_counter() - t0
    del tr
    return tokens / dt, peak_gib(), losses


def fixed_examples(n: int, seq: int, vocab: int, seed: int = 0):
    from quantforge.train.data import Example

    g = torch.Generator().manual_seed(seed)
    return [Example(torch.randint(3, vocab, (seq,), generator=g).tolist(), [1] * seq) for _ in range(n)]


def length_examples(lengths: list[int], vocab: int, seed: int = 0):
    from quantforge.train.data import Example

    g = torch.Generator().manual_seed(seed)
    return [Example(torch.randint(3, vocab, (n,), generator=g).tolist(), [1] * n) for n in lengths]


# -------------------------------------------------------------------------------------------------- reference
def hf_load(path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                             attn_implementation="sdpa", device_map={"": 0})
    m.config.use_cache = False
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.enable_input_require_grads()
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                     task_type="CAUSAL_LM"))
    m.train()
    return m


def hf_batches(examples, batch: int):
    """Right-padded batches of ``batch`` examples as HF's default collator builds them (pad to the longest)."""
    out = []
    for i in range(0, len(examples), batch):
        group = examples[i:i + batch]
        n = max(len(e) for e in group)
        ids = torch.full((len(group), n), 2, dtype=torch.long)
        att = torch.zeros((len(group), n), dtype=torch.long)
        lab = torch.full((len(group), n), -100, dtype=torch.long)
        for j, e in enumerate(group):
            ids[j, :len(e)] = torch.tensor(e.ids)
            att[j, :len(e)] = 1
            lab[j, :len(e)] = torch.tensor([t if m else -100 for t, m in zip(e.ids, e.loss_mask)])
        out.append((ids, att, lab, sum(len(e) for e in group)))
    return out


def hf_step(model, opt, batch):
    ids, att, lab, _ = batch
    outp = model(input_ids=ids.cuda(), attention_mask=att.cuda(), labels=lab.cuda())
    outp.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(outp.loss.detach())


def hf_run(model, batches, steps: int, warmup: int = 1):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    reset_peak()
    for b in batches[:warmup]:
        hf_step(model, opt, b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = 0
    for b in batches[warmup:warmup + steps]:
        hf_step(model, opt, b)
        tokens += b[3]
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del opt
    return tokens / dt, peak_gib()


# ------------------------------------------------------------------------------------------------- benchmarks
def dolly_examples(assets: Path, tok, limit: int):
    from quantforge.train.data import detect_shape, tokenize_record

    rows = [json.loads(line) for line in (assets / "dolly_1500.jsonl").read_text().splitlines()[:limit]]
    shape = detect_shape(list(rows[0]))
    out = [tokenize_record(tok, r, shape) for r in rows]
    return [e for e in out if e is not None and len(e) <= 2048]


def profiled_step(model, batch: int, vocab: int, host: bool = False) -> tuple:
    """One profiled optimizer step at ``SEQ x batch`` (after a warm-up step): its wall seconds and the CUDA kernels'
    profiler averages (with ``host``, also the CPU-side ops' averages)."""
    from torch.profiler import ProfilerActivity, profile

    from quantforge.train.config import TrainConfig
    from quantforge.train.loop import Trainer

    cfg = TrainConfig(batch_tokens=batch * SEQ, max_seq_len=SEQ, max_steps=2, optimizer="adamw", lr=1e-4,
                      eval_split=0.0)
    model.train()
    tr = Trainer(model, fixed_examples(2 * batch, SEQ, vocab), [], cfg)
    tr.step(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        tr.step(1)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    del tr
    avgs = prof.key_averages()
    cuda = [e for e in avgs if e.device_type == torch.autograd.DeviceType.CUDA]
    if host:
        return wall, cuda, [e for e in avgs if e.device_type == torch.autograd.DeviceType.CPU]
    return wall, cuda


def profile_step(model, batch: int, vocab: int) -> None:
    """One profiled optimizer step at ``SEQ x batch`` (after a warm-up step): the CUDA kernels by total time, and
    how much of the step's wall time the GPU was busy."""
    wall, events = profiled_step(model, batch, vocab)
    busy = sum(e.self_device_time_total for e in events) / 1e6
    log(f"\nprofile {SEQ} x {batch}: step {wall * 1e3:.0f} ms wall, GPU kernels {busy * 1e3:.0f} ms "
        f"({busy / wall:.0%} of the step)")
    log("| kernel | calls | total ms | share |\n|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:30]:
        log(f"| {e.key[:90]} | {e.count} | {e.self_device_time_total / 1e3:.1f} | "
            f"{e.self_device_time_total / 1e6 / busy:.1%} |")


def speed(args, path: Path, tok, results: dict) -> None:
    vocab = LLAMA8B["vocab_size"]
    dolly = dolly_examples(Path(args.assets), tok, 1500)
    random.Random(0).shuffle(dolly)
    lengths = [len(e) for e in dolly]
    rows = []
    var_row: dict = {}
    t0 = time.perf_counter()
    if args.only_long:
        args.batches, args.skip_reference = [], True
    model = ours_load(path)
    log(f"ours: loaded in {time.perf_counter() - t0:.1f}s, {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    if args.profile:
        profile_step(model, args.profile, vocab)
    for b in args.batches:
        tps, pk, _ = ours_run(model, fixed_examples(b * (args.steps + 1), SEQ, vocab), b * SEQ, args.steps)
        rows.append({"case": f"{SEQ} x {b}", "ours_tps": tps, "ours_gib": pk})
        log(f"ours {SEQ}x{b}: {tps:,.0f} tok/s, {pk:.1f} GiB")
    var_ex = length_examples(lengths, vocab)
    if not args.only_long:
        tps, pk, _ = ours_run(model, var_ex, args.var_tokens, args.steps)
        var_row = {"case": f"Dolly lengths (ours packed {args.var_tokens} tok, ref batch {args.var_batch} padded)",
                   "ours_tps": tps, "ours_gib": pk}
        log(f"ours dolly: {tps:,.0f} tok/s, {pk:.1f} GiB")
    del model
    reset_peak()
    if not args.skip_reference:
        t0 = time.perf_counter()
        ref = hf_load(path)
        log(f"reference: loaded in {time.perf_counter() - t0:.1f}s")
        for row, b in zip(rows, args.batches):
            ex = fixed_examples(b * (args.steps + 1), SEQ, vocab)
            try:
                tps, pk = hf_run(ref, hf_batches(ex, b), args.steps)
            except torch.cuda.OutOfMemoryError:
                tps, pk = None, None
            row.update({"ref_tps": tps, "ref_gib": pk})
            log(f"reference {SEQ}x{b}: {tps or 0:,.0f} tok/s, {pk or 0:.1f} GiB")
        n_var = sum(1 for _ in range(0, len(var_ex), args.var_batch))
        tps, pk = hf_run(ref, hf_batches(var_ex, args.var_batch)[:min(n_var, 4 * args.steps + 2)], 4 * args.steps,
                         warmup=2)
        var_row.update({"ref_tps": tps, "ref_gib": pk})
        log(f"reference dolly: {tps:,.0f} tok/s, {pk:.1f} GiB")
        del ref
        reset_peak()
    model = ours_load(path) if args.long else None
    long_rows = []
    last = 0.0
    for n in args.long:
        if time.perf_counter() - START + 4 * last > args.long_budget_s:
            log(f"ours long {n}: not run (time budget of {args.long_budget_s:.0f}s for this script)")
            break
        try:
            t_long = time.perf_counter()
            tps, pk, _ = ours_run(model, fixed_examples(2, n, vocab), n, 1, warmup=0)
            long_rows.append({"tokens": n, "ours_tps": tps, "ours_gib": pk})
            last = time.perf_counter() - t_long
            log(f"ours long {n}: {tps:,.0f} tok/s, {pk:.1f} GiB ({last:.0f}s)")
        except torch.cuda.OutOfMemoryError:
            long_rows.append({"tokens": n, "ours_tps": None, "ours_gib": None})
            log(f"ours long {n}: out of memory")
            break
    results.update({"fixed": rows, "long": long_rows, **({"variable": var_row} if var_row else {})})


# ------------------------------------------------------------------------------------- GGUF layout vs NF4
Q4_K_M_PLAN = "version: 1\ntarget: gguf\nbase_type: q4_k_m\n"
#: Kernel groups of the per-kernel timing: (substring of the CUDA kernel name, group), first match wins.
KERNEL_GROUPS = (("blocks_kernel", "dequantize"), ("dequant_kernel", "dequantize"), ("nvjet", "GEMM (cuBLAS)"),
                 ("gemm", "GEMM (cuBLAS)"), ("flash", "attention"), ("Memcpy", "offload copies"))


def kernel_group(name: str) -> str:
    return next((g for key, g in KERNEL_GROUPS if key in name), "other")


def held_types(model) -> dict[str, int]:
    """Projection count per held format."""
    counts: dict[str, int] = {}
    for m in model.lora_modules().values():
        counts[m.base.fmt] = counts.get(m.base.fmt, 0) + 1
    return dict(sorted(counts.items()))


def check_bases(model) -> list[str]:
    """For the first projection of each held format: the trainer's transient base copy (the whole-tensor Triton
    dequantize on the GPU) equals the codec's dequantize of the same bytes on the CPU, bit for bit."""
    from quantforge.kernels.lora_linear import _dequant

    seen, out = set(), []
    for name, m in model.lora_modules().items():
        if m.base.fmt in seen:
            continue
        seen.add(m.base.fmt)
        gpu = _dequant(m.base, torch.bfloat16).cpu()
        cpu = m.base.to("cpu").dequantize(torch.float32).to(torch.bfloat16)
        out.append(f"{m.base.fmt} ({name.split('.', 2)[-1]}): {'equal' if torch.equal(gpu, cpu) else 'DIFFERENT'}")
    return out


def dequant_speed(rows: int = 14336, cols: int = 4096) -> list[dict]:
    """Standalone whole-tensor dequantize of one ``rows x cols`` weight to bf16 per format (``do_bench`` median)."""
    from triton.testing import do_bench

    from quantforge.kernels import tiles
    from quantforge.kernels.qweight import QuantWeight

    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(rows, cols, generator=g, device="cuda") * 0.02
    out = []
    for fmt in ("nf4", "q4_k", "q6_k"):
        q = QuantWeight.quantize(w, fmt)
        buf = torch.empty(rows, cols, dtype=torch.bfloat16, device="cuda")
        ms = do_bench(lambda: tiles.dequantize(q.format, q.data, torch.bfloat16, aux=q.extra.get("aux"),
                                               double_quant=q.double_quant, out=buf), warmup=20, rep=100,
                      return_mode="median")
        moved = q.nbytes + buf.numel() * buf.element_size()
        out.append({"format": fmt + (" (double-quantized)" if q.double_quant else ""), "us": ms * 1e3,
                    "tbs": moved / ms / 1e9})
    return out


def fused_speed(m: int = 16, rows: int = 14336, cols: int = 4096, rank: int = 16) -> list[dict]:
    """The fused dequantize + LoRA forward (the few-token path of ``lora_linear``, autotuned as a user's first call
    tunes it) per format at ``m`` tokens on one ``rows x cols`` projection (``do_bench`` median)."""
    from triton.testing import do_bench

    from quantforge.kernels.lora_linear import fused_backward_dx, fused_forward
    from quantforge.kernels.qweight import QuantWeight

    g = torch.Generator(device="cuda").manual_seed(2)
    w = torch.randn(rows, cols, generator=g, device="cuda") * 0.02
    x = torch.randn(m, cols, generator=g, device="cuda").to(torch.bfloat16)
    a = (torch.randn(rank, cols, generator=g, device="cuda") * 0.01).to(torch.bfloat16)
    b = (torch.randn(rows, rank, generator=g, device="cuda") * 0.01).to(torch.bfloat16)
    out = []
    for fmt in ("nf4", "q4_k", "q6_k"):
        q = QuantWeight.quantize(w, fmt)
        y, _ = fused_forward(x, None, q, a, b, None, 1.0)
        ref = x.float() @ q.dequantize(torch.float32).t() + (x.float() @ a.float().t()) @ b.float().t()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        ms = do_bench(lambda: fused_forward(x, None, q, a, b, None, 1.0), warmup=20, rep=100, return_mode="median")
        dy = torch.randn(m, rows, generator=g, device="cuda").to(torch.bfloat16)
        dx, _ = fused_backward_dx(dy, q, a, b, 1.0, True)
        ref_dx = dy.float() @ q.dequantize(torch.float32) + (dy.float() @ b.float()) @ a.float()
        out.append({"format": fmt, "us": ms * 1e3, "rel_err": err,
                    "dx_rel_err": ((dx.float() - ref_dx).norm() / ref_dx.norm()).item()})
    return out


def gguf_vs_nf4(args, path: Path, work: Path, results: dict) -> None:
    """The trainer on the q4_k_m plan's GGUF layout against its NF4 path, same checkpoint, steps, batches, sequence
    length and rank: tokens/s and peak memory per arm, one profiled step per arm (time per kernel group and per
    dequantize kernel), and the standalone dequantize speed of the formats involved."""
    vocab = LLAMA8B["vocab_size"]
    plan = work / "q4_k_m.plan.yaml"
    plan.write_text(Q4_K_M_PLAN)
    arms = {"nf4": ("NF4 (double-quantized)", {"fmt": "nf4"}),
            "gguf": ("q4_k_m plan (GGUF layout)", {"fmt": "gguf", "plan": plan})}
    res: dict = {"arms": {}}
    results["gguf"] = res
    for key, (label, kw) in arms.items():
        reset_peak()
        t0 = time.perf_counter()
        model = ours_load(path, **kw)
        torch.cuda.synchronize()
        arm = {"label": label, "load_s": time.perf_counter() - t0, "held_gib": torch.cuda.memory_allocated() / 2**30,
               "types": held_types(model), "checks": check_bases(model), "runs": {}}
        res["arms"][key] = arm
        log(f"{label}: loaded in {arm['load_s']:.1f}s, {arm['held_gib']:.2f} GiB, projections {arm['types']}; "
            f"base copies vs codec: {', '.join(arm['checks'])}")
        for b in args.batches:
            reps = []
            steps = args.steps * max(1, 8 // b)  # about the same tokens (and seconds) per timed run at every batch
            for _ in range(args.gguf_repeats):
                tps, pk, losses = ours_run(model, fixed_examples(b * (steps + 1), SEQ, vocab), b * SEQ, steps)
                if not all(map(math.isfinite, losses)):
                    raise SystemExit(f"{label} {SEQ}x{b}: non-finite loss {losses}")
                reps.append(tps)
                log(f"{label} {SEQ}x{b}: {tps:,.0f} tok/s, {pk:.1f} GiB, losses {[round(x, 4) for x in losses]}")
            arm["runs"][b] = {"tps": sorted(reps)[len(reps) // 2], "gib": pk, "losses": losses, "repeats": reps}
        if args.gguf_profile:
            wall, events, host = profiled_step(model, args.gguf_profile, vocab, host=True)
            busy = sum(e.self_device_time_total for e in events) / 1e3
            launches = sum(e.count for e in host if "LaunchKernel" in e.key)
            log(f"{label} profile {SEQ}x{args.gguf_profile}: GPU busy {busy:.0f} ms of {wall * 1e3:.0f} ms wall, "
                f"{launches} kernel launches; host ops by self CPU time:")
            for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:15]:
                log(f"  {e.key[:70]} | {e.count} calls | {e.self_cpu_time_total / 1e3:.1f} ms")
            groups: dict[str, float] = {}
            for e in events:
                g = kernel_group(e.key)
                groups[g] = groups.get(g, 0.0) + e.self_device_time_total / 1e3
            arm["profile"] = {"batch": args.gguf_profile, "wall_ms": wall * 1e3, "busy_ms": busy, "launches": launches,
                              "groups": groups,
                              "dequant": [(e.key, e.count, e.self_device_time_total / 1e3) for e in events
                                          if kernel_group(e.key) == "dequantize"]}
            log(f"{label} profile {SEQ}x{args.gguf_profile}: {wall * 1e3:.0f} ms wall, "
                + ", ".join(f"{g} {ms:.1f} ms" for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])))
        del model
        reset_peak()
    res["dequant"] = dequant_speed()
    res["fused"] = fused_speed()


def print_gguf(res: dict) -> None:
    arms = res["arms"]
    nf4, gg = arms.get("nf4"), arms.get("gguf")
    for arm in arms.values():
        log(f"\n{arm['label']}: projections held {arm['types']}; base copies vs the codec's dequantize: "
            f"{', '.join(arm['checks'])}; loaded in {arm['load_s']:.1f} s ({arm['held_gib']:.2f} GiB held)")

    def cell(arm, b):
        r = (arm or {}).get("runs", {}).get(b)
        return f"{r['tps']:,.0f} @ {r['gib']:.1f}" if r else "-"

    log("\n| case | NF4 tok/s @ peak GiB | q4_k_m plan tok/s @ peak GiB | speed (q4_k_m / NF4) | memory (q4_k_m / NF4) |")
    log("|---|---|---|---|---|")
    for b in (nf4 or {}).get("runs", {}):
        a, g = nf4["runs"][b], (gg or {}).get("runs", {}).get(b)
        ratios = f"{g['tps'] / a['tps']:.3f} | {g['gib'] / a['gib']:.3f}" if g else "- | -"
        log(f"| {SEQ} x {b} | {cell(nf4, b)} | {cell(gg, b)} | {ratios} |")
    for arm in arms.values():
        for b, r in arm.get("runs", {}).items():
            if len(r.get("repeats", [])) > 1:
                log(f"{arm['label']} {SEQ} x {b}, each timed run: {', '.join(f'{t:,.0f}' for t in r['repeats'])} "
                    "tok/s (median in the table)")
    if nf4 and gg and "profile" in nf4 and "profile" in gg:
        p, q = nf4["profile"], gg["profile"]
        log(f"\nprofiled step {SEQ} x {p['batch']} (GPU ms per kernel group; wall {p['wall_ms']:.0f} vs "
            f"{q['wall_ms']:.0f} ms, GPU busy {p.get('busy_ms', 0):.0f} vs {q.get('busy_ms', 0):.0f} ms, "
            f"{p.get('launches', 0)} vs {q.get('launches', 0)} kernel launches)")
        log("| kernel group | NF4 ms | q4_k_m plan ms | difference ms |\n|---|---|---|---|")
        for grp in sorted(set(p["groups"]) | set(q["groups"]), key=lambda k: -p["groups"].get(k, 0.0)):
            a, c = p["groups"].get(grp, 0.0), q["groups"].get(grp, 0.0)
            log(f"| {grp} | {a:.1f} | {c:.1f} | {c - a:+.1f} |")
        log("\n| dequantize kernel | arm | calls | ms |\n|---|---|---|---|")
        for arm_name, prof in (("NF4", p), ("q4_k_m", q)):
            for name, calls, ms in prof["dequant"]:
                log(f"| {name[:60]} | {arm_name} | {calls} | {ms:.1f} |")
    log("\n| dequantize 14336x4096 -> bf16 | us | TB/s (packed + bf16) |\n|---|---|---|")
    for r in res.get("dequant", []):
        log(f"| {r['format']} | {r['us']:.1f} | {r['tbs']:.2f} |")
    log("\n| fused kernels, 16 tokens, 14336x4096, r=16 | forward us | forward rel. error | backward dx rel. error |"
        "\n|---|---|---|---|")
    for r in res.get("fused", []):
        log(f"| {r['format']} | {r['us']:.1f} | {r['rel_err']:.1e} | {r['dx_rel_err']:.1e} |")


def loss_curve(args, assets: Path, work: Path, results: dict) -> None:
    """50 steps on SmolLM2 (``--curve-model``, the bf16 checkpoint) or, without it, on the SmolLM2 shape with random
    weights: same initial adapter, data order and hyper-parameters; per-step losses."""
    from transformers import AutoTokenizer

    from quantforge.train.config import TrainConfig
    from quantforge.train.loop import Trainer

    if args.curve_model:
        path = Path(args.curve_model)
        log(f"loss curve on the checkpoint {path}")
    else:
        cfg_small = json.loads((assets / "smollm2" / "config.json").read_text())
        keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rms_norm_eps", "vocab_size", "max_position_embeddings", "num_hidden_layers", "rope_parameters")
        shape = {k: cfg_small[k] for k in keep}
        path = write_model(work / "smollm2-shape", {**shape, "tie_word_embeddings": False}, assets, seed=1,
                           std=0.05)
    tok = AutoTokenizer.from_pretrained(path)
    examples = dolly_examples(assets, tok, 1500)
    examples = [e for e in examples if len(e) <= 512]
    steps = args.curve_steps
    cfg = TrainConfig(batch_tokens=2048, max_seq_len=512, max_steps=steps, optimizer="adamw", lr=5e-4,
                      schedule="constant", eval_split=0.0, max_grad_norm=1.0)
    model = ours_load(path)
    init = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in model.lora_modules().items()}
    tr = Trainer(model, examples, [], cfg)
    torch.manual_seed(0)
    ours = [tr.step(s)["loss"] for s in range(steps)]
    groups = [tr.schedule.micro_batch(s)[1] for s in range(steps)]
    del tr, model
    reset_peak()
    ref = hf_load(path)
    with torch.no_grad():
        for name, mod in ref.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in init and hasattr(mod, "lora_A"):
                mod.lora_A["default"].weight.copy_(init[key][0])
                mod.lora_B["default"].weight.copy_(init[key][1])
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.0)
    theirs = [hf_step(ref, opt, hf_batches([examples[i] for i in g], len(g))[0]) for g in groups]
    rel = [abs(a - b) / b for a, b in zip(ours, theirs)]
    results["curve"] = {"ours": ours, "reference": theirs, "max_rel_diff": max(rel),
                        "n_lora_copied": len(init)}
    log(f"loss curve: max relative difference {max(rel):.4%} over {steps} steps "
        f"(first {ours[0]:.4f} vs {theirs[0]:.4f}, last {ours[-1]:.4f} vs {theirs[-1]:.4f})")
    del ref, opt
    reset_peak()


def _ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def print_tables(res: dict) -> None:
    speed_rows = res.get("fixed", []) + ([res["variable"]] if "variable" in res else [])
    if speed_rows:
        log("\n| case | HF+PEFT+bnb tok/s @ GiB | quantforge tok/s @ GiB | speed | memory |")
        log("|---|---|---|---|---|")
    for r in speed_rows:
        ref = f"{r['ref_tps']:,.0f} @ {r['ref_gib']:.1f}" if r.get("ref_tps") else "-"
        log(f"| {r['case']} | {ref} | {r['ours_tps']:,.0f} @ {r['ours_gib']:.1f} | "
            f"{_ratio(r['ours_tps'], r.get('ref_tps'))} | {_ratio(r['ours_gib'], r.get('ref_gib'))} |")
    if res.get("long"):
        log("\n| tokens at batch 1 | quantforge tok/s @ GiB |")
        log("|---|---|")
        for r in res["long"]:
            cell = f"{r['ours_tps']:,.0f} @ {r['ours_gib']:.1f}" if r["ours_tps"] else "out of memory"
            log(f"| {r['tokens']:,} | {cell} |")
    if "gguf" in res:
        print_gguf(res["gguf"])
    if "curve" in res:
        c = res["curve"]
        log(f"\nloss curve ({len(c['ours'])} steps): max |ours - ref| / ref = {c['max_rel_diff']:.4%}")
        log("step: " + " ".join(f"{i + 1}:{a:.4f}/{b:.4f}" for i, (a, b) in enumerate(zip(c["ours"], c["reference"]))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=".bench/qlora", help="SmolLM2 tokenizer/config and Dolly records")
    ap.add_argument("--workdir", default="/tmp/qlora")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--var-tokens", type=int, default=16384)
    ap.add_argument("--var-batch", type=int, default=8)
    ap.add_argument("--long", type=int, nargs="*", default=[32768, 65536, 131072, 262144])
    ap.add_argument("--long-budget-s", type=float, default=400.0,
                    help="skip longer sequences once the script would run past this many seconds")
    ap.add_argument("--curve-steps", type=int, default=50)
    ap.add_argument("--curve-model", default=None,
                    help="bf16 HF checkpoint for the loss curve (default: the SmolLM2 shape, random weights)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-curve", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--only-long", action="store_true", help="run only the --long sequences (no reference)")
    ap.add_argument("--profile", type=int, default=0, metavar="BATCH",
                    help="profile one step at 2048 x BATCH first and print where the GPU time goes")
    ap.add_argument("--gguf", action="store_true",
                    help="also train on the q4_k_m plan's GGUF layout against NF4 (same --batches and --steps)")
    ap.add_argument("--gguf-repeats", type=int, default=1,
                    help="with --gguf: timed runs per arm and batch (the table shows their median)")
    ap.add_argument("--gguf-profile", type=int, default=0, metavar="BATCH",
                    help="with --gguf: profile one step at 2048 x BATCH per arm (time per kernel group)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    assets, work = Path(args.assets), Path(args.workdir)
    log(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, python {sys.version.split()[0]}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results: dict = {}
    if not args.skip_curve:
        loss_curve(args, assets, work, results)
    if not args.skip_speed or args.gguf:
        t0 = time.perf_counter()
        path = write_model(work / "llama8b-shape", {**LLAMA8B, "num_hidden_layers": args.layers}, assets)
        log(f"wrote the {args.layers}-layer 8B-shaped checkpoint in {time.perf_counter() - t0:.1f}s")
        if not args.skip_speed:
            speed(args, path, AutoTokenizer.from_pretrained(path), results)
        if args.gguf:
            try:
                gguf_vs_nf4(args, path, work, results)
            except Exception:  # print what was measured before the failure, then the traceback
                print_tables(results)
                raise
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
