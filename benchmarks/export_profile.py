"""Where the time of ``quantforge quantize --format gguf`` goes: the serial path's per-chunk stages, and the
pipelined path's stage timers, on a Llama-3.1-8B-shaped checkpoint on local disk.

    python benchmarks/export_profile.py --dir /tmp/l8b [--layers 32] [--types q4_k_m] [--device cuda]

1. Serial path, per row chunk (as ``EncodedTensor.encode`` ran it before the pipeline, 4M-weight chunks, and at
   the GPU chunk size): read the rows (``ModelSource.get``), copy to the device and widen, count NaN/Inf (the
   host waits for the count), permute, quantize, copy the bytes back; each stage synchronized and timed.
2. Pipelined path: one in-process export per type with :mod:`quantforge.exporters.gguf.pipeline`'s stage timers.
3. Check: on a small checkpoint the pipelined file on ``--device`` equals the serial file and the CPU file.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402
from export_speed import LLAMA_8B, build_checkpoint  # noqa: E402


def serial_stages(model: Path, device: str, chunk_elems: int, names: list[str], mix: str) -> list[list[object]]:
    """Per-chunk stage times (ms, mean over the chunks of ``names``) of the serial path."""
    import torch

    from quantforge import arch as archmod
    from quantforge.arch_hparams import resolve_arch
    from quantforge.exporters.gguf.writer import EncodedTensor
    from quantforge.model_source import ModelSource
    from quantforge.tensor_layout import assign_types, model_shape, plan_tensors

    src = ModelSource.open(model)
    spec = resolve_arch(src.model_type, src.text_config)
    jobs = plan_tensors(src, spec)
    assign_types(jobs, mix, model_shape(src, jobs), False, None)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for job in [j for j in jobs if j.hf_name in names]:
        e = EncodedTensor(src, spec, job, None, chunk_elems=chunk_elems, device=device)
        e.encode(*e.ranges[0])  # warm-up (kernel compiles, allocator)
        sync()
        acc = dict.fromkeys(("read", "H2D+widen", "NaN count (sync)", "permute", "quantize", "D2H"), 0.0)
        for a, b in e.ranges:
            t0 = time.perf_counter()
            raw = src.get(job.hf_name, rows=(a, b))
            t1 = time.perf_counter()
            t = raw.to(device, torch.float32)
            sync()
            t2 = time.perf_counter()
            bad = int((~torch.isfinite(t)).sum())
            t3 = time.perf_counter()
            if e.heads is not None:
                t = archmod.permute_rows(t, e.heads * (b - a) // job.shape[0])
            t = t.reshape(t.shape[0], -1).contiguous()
            sync()
            t4 = time.perf_counter()
            enc = e.quantize(t, a, device)
            sync()
            t5 = time.perf_counter()
            enc.cpu().numpy()
            t6 = time.perf_counter()
            for k, v in zip(acc, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=True):
                acc[k] += v
            assert bad == 0
        n = len(e.ranges)
        total = sum(acc.values())
        rows.append([job.gguf_name, job.fmt, chunk_elems, n, *(1e3 * v / n for v in acc.values()),
                     1e3 * total / n, e.fmt_numel() * 2 / total / 1e9])
    src.close()
    return rows


def check_bytes(work: Path, device: str, tokenizer: Path) -> list[list[object]]:
    from quantforge.exporters.gguf.writer import write_gguf
    from quantforge.model_source import ModelSource

    cfg = {**LLAMA_8B, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 49152}
    model = build_checkpoint(work / "small", cfg, tokenizer)
    src = ModelSource.open(model)
    out = []
    for mix in ("q4_k_m", "q6_k", "q8_0"):
        digests = {}
        for label, kw in (("cpu", {"device": "cpu"}), (f"{device} serial", {"device": device, "pipelined": False}),
                          (f"{device} pipelined", {"device": device}),
                          (f"{device} pipelined 1M chunks", {"device": device, "chunk_elems": 1 << 20})):
            f = write_gguf(src, work / "check.gguf", mix, force=True, **kw)
            digests[label] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
        same = len(set(digests.values())) == 1
        out.append([mix, *digests.values(), "yes" if same else "NO"])
    src.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/export-speed")
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / ".bench" / "qlora" / "smollm2"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--types", default="q4_k_m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    import torch

    from export_speed import profile_run, warm_page_cache

    work = Path(args.dir)
    if not args.skip_check:
        print(table(["mix", "cpu", f"{args.device} serial", f"{args.device} pipelined", "pipelined 1M chunks",
                     "identical"], check_bytes(work, args.device, Path(args.tokenizer))), flush=True)
    cfg = {**LLAMA_8B, "num_hidden_layers": args.layers}
    t0 = time.perf_counter()
    model = build_checkpoint(work / "ckpt", cfg, Path(args.tokenizer),
                             device="cuda" if torch.cuda.is_available() else "cpu")
    shards = sorted(model.glob("*.safetensors"))
    print(f"checkpoint: {sum(p.stat().st_size for p in shards) / 1e9:.2f} GB, {time.perf_counter() - t0:.1f} s",
          flush=True)
    warm_page_cache(shards)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
             "model.layers.0.mlp.down_proj.weight"]
    rows = []
    for ce in (1 << 22, 1 << 26):
        rows += serial_stages(model, args.device, ce, names, args.types.split(",")[0])
    print(table(["tensor", "type", "chunk weights", "chunks", "read ms", "H2D+widen ms", "NaN count (sync) ms",
                 "permute ms", "quantize ms", "D2H ms", "total ms/chunk", "GB/s of bf16"], rows), flush=True)
    for mix in args.types.split(","):
        warm_page_cache(shards)
        print(f"\npipelined export, {mix}, warm page cache, in-process")
        print(profile_run(model, mix, work / "profile.gguf", args.device), flush=True)
    (work / "profile.gguf").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
