"""GPU: merge a LoRA adapter into a Llama-3.1-8B-shaped checkpoint and export q4_k_m GGUF, quantforge against the
usual path, every step a process of its own timed as a user runs it (wall time, peak RSS through ``wait4``).

quantforge: ``quantforge merge CKPT ADAPTER --format gguf --type q4_k_m --device cuda -o OUT`` (one command).
Reference: PEFT ``merge_and_unload`` on the GPU + ``save_pretrained`` (bf16), llama.cpp's ``convert_hf_to_gguf.py
--outtype bf16``, ``llama-quantize ... Q4_K_M THREADS`` (llama.cpp as vendored by llama-cpp-python,
``benchmarks/build_llama_cpp.sh``). The checkpoint (random bf16, 4 shards, SmolLM2's tokenizer; built by
``export_speed.build_checkpoint``) and the adapter (r=16, alpha 32, all seven projections of every layer, random A
and B) are made first and not timed; both sides read the checkpoint from a warm page cache.

    python benchmarks/merge_export_gpu.py --dir /tmp/merge8b --tokenizer .bench/qlora/smollm2 \\
        --llama-src .bench/llama.cpp-src --llama-bin .bench/llama-build/bin [--steps ours,peft,convert,quantize] \\
        [--check]

On the GPU machine ``bash benchmarks/merge_device.sh 8b`` runs it all in one invocation. ``--check`` then verifies
(untimed, on a small model of the same family) that the GPU merge, which adds the delta row chunk by row chunk
inside the export pipeline, writes the bytes of the tensor-by-tensor merge. A step that fails is reported and the
table printed all the same. ``--profile`` prints the export pipeline's stage timers of one more (untimed) merge
run in this process, right after the timed one.

Each step's numbers are kept in ``DIR/steps.json``, so the steps can run in separate invocations on one machine
(the table then says so); ``--stop-at UNIX_TIME`` skips the steps that would end after it (by
:data:`EXPECTED_S`). Intermediate files
are deleted as soon as the next step no longer needs them (the machine's disk holds two 16 GB copies at most).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH, LLAMA_BIN, LLAMA_SRC  # noqa: E402
from export_speed import LLAMA_8B, TOKENIZER_FILES, build_checkpoint, warm_page_cache  # noqa: E402
from merge_export import MERGE_SCRIPT, TARGETS, run  # noqa: E402

STEPS = ("ours", "peft", "convert", "quantize")
LABELS = {"ours": "quantforge merge -> q4_k_m", "peft": "  PEFT merge_and_unload + save bf16",
          "convert": "  convert_hf_to_gguf.py bf16", "quantize": "  llama-quantize Q4_K_M"}
RANK, ALPHA = 16, 32
EXPECTED_S = {"ours": 45, "peft": 70, "convert": 110, "quantize": 80, "check": 60, "profile": 40}
"""Seconds a step may take on an H200 machine (page-cache warm-up included), for ``--stop-at``."""


def emit(*parts: object, **kw: object) -> None:
    """The script's output (status lines and the table)."""
    print(*parts, **kw, flush=True)  # noqa: T201


def write_adapter(ckpt: Path, out: Path, device: str, seed: int = 0) -> Path:
    """A PEFT LoRA adapter for ``ckpt``: r=16 on the seven projections of every layer, A ~ N(0, 1/in), B ~
    N(0, 0.01^2) (non-zero, so the merge changes every weight), float32."""
    import torch
    from export_speed import llama_shapes
    from safetensors.torch import save_file

    if (out / "adapter_model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    g = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, shape in llama_shapes(cfg).items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        rows, cols = shape
        a = torch.randn((RANK, cols), generator=g, device=device) / cols ** 0.5
        b = torch.randn((rows, RANK), generator=g, device=device) * 0.01
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.cpu()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.cpu()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
              "target_modules": TARGETS, "bias": "none", "base_model_name_or_path": str(ckpt),
              "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out


def step(name: str, ckpt: Path, adapter: Path, work: Path, args: argparse.Namespace) -> tuple[float, float, dict]:
    """Run one timed step; returns (wall s, peak RSS MiB, facts about its output)."""
    py = sys.executable
    llama_env = {"LD_LIBRARY_PATH": str(args.llama_bin)}
    if name == "ours":
        out = work / "ours-q4_k_m.gguf"
        wall, rss = run([*args.qf, "merge", str(ckpt), str(adapter), "--format", "gguf", "--type", "q4_k_m",
                         "--device", args.device, "-o", str(out), "--force", "--quiet"])
        facts = {"file_gb": out.stat().st_size / 1e9}
        out.unlink()
        return wall, rss, facts
    if name == "peft":
        merged = work / "peft-merged"
        shutil.rmtree(merged, ignore_errors=True)
        script = MERGE_SCRIPT.replace("dtype=torch.bfloat16", f"dtype=torch.bfloat16, device_map={args.device!r}")
        wall, rss = run([py, "-c", script, str(ckpt), str(adapter), str(merged)])
        for f in (*TOKENIZER_FILES, "chat_template.jinja"):
            if (ckpt / f).is_file():
                shutil.copy(ckpt / f, merged / f)
        return wall, rss, {"shards": len(list(merged.glob("*.safetensors")))}
    if name == "convert":
        merged, bf16 = work / "peft-merged", work / "ref-bf16.gguf"
        warm_page_cache(sorted(merged.glob("*.safetensors")))
        wall, rss = run([py, str(args.llama_src / "convert_hf_to_gguf.py"), str(merged), "--outtype", "bf16",
                         "--outfile", str(bf16)], safe_path=False)
        shutil.rmtree(merged)
        return wall, rss, {"file_gb": bf16.stat().st_size / 1e9}
    bf16, out = work / "ref-bf16.gguf", work / "ref-q4_k_m.gguf"
    warm_page_cache([bf16])
    wall, rss = run([str(args.llama_bin / "llama-quantize"), str(bf16), str(out), "Q4_K_M", str(args.threads)],
                    env=llama_env)
    facts = {"file_gb": out.stat().st_size / 1e9}
    bf16.unlink()
    out.unlink()
    return wall, rss, facts


def check_row_merge(work: Path, tokenizer: Path, args: argparse.Namespace) -> str:
    """Write one small merged model three ways on the GPU: the ``merge`` command (row-chunk merge in the export
    pipeline's encoder), the same with small row chunks (tensors split unevenly), and the merged source read
    tensor by tensor (every target merged whole, then cut into rows); returns a line saying whether the files
    are identical."""
    import hashlib

    from quantforge.exporters.gguf.writer import write_gguf

    from quantforge.merged_source import MergedSource

    class TensorByTensor(MergedSource):
        read_rows = None
        finish_rows = None

    cfg = {**LLAMA_8B, "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 49152}
    ckpt = build_checkpoint(work / "check-ckpt", cfg, tokenizer, shards=1, device=args.device)
    adapter = write_adapter(ckpt, work / "check-adapter", args.device)
    files = {"merge command": work / "check-cli.gguf", "row chunks of 1M weights": work / "check-rows.gguf",
             "tensor by tensor": work / "check-whole.gguf"}
    run([*args.qf, "merge", str(ckpt), str(adapter), "--format", "gguf", "--type", "q4_k_m", "--device", args.device,
         "-o", str(files["merge command"]), "--force", "--quiet"])
    for cls, key, chunk in ((MergedSource, "row chunks of 1M weights", 1 << 20),
                            (TensorByTensor, "tensor by tensor", None)):
        src = cls.open_merged(ckpt, adapter, device=args.device)
        try:
            write_gguf(src, files[key], qtype="q4_k_m", force=True, device=args.device, chunk_elems=chunk)
        finally:
            src.close()
    digests = {k: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for k, f in files.items()}
    same = len(set(digests.values())) == 1
    return (f"row-chunk merge check ({args.device}, 2-layer model of hidden 1024, q4_k_m): "
            f"{'identical files' if same else 'FILES DIFFER'} ({', '.join(f'{k} {v}' for k, v in digests.items())})")


def profile_merge(ckpt: Path, adapter: Path, work: Path, device: str) -> str:
    """The merge once more, in this process, with the export pipeline's stage timers (untimed as a step)."""
    import torch
    from quantforge.exporters.gguf import pipeline
    from quantforge.exporters.gguf.writer import write_gguf

    from quantforge.merged_source import MergedSource

    stats = pipeline.Stats()
    out = work / "profile.gguf"
    t0 = time.perf_counter()
    src = MergedSource.open_merged(ckpt, adapter, device=device)
    try:
        with pipeline.collect(stats):
            write_gguf(src, out, qtype="q4_k_m", force=True, device=device)
    finally:
        src.close()
    wall = time.perf_counter() - t0
    out.unlink()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return "in-process merge with stage timers (after the timed run):\n" + stats.table(wall)


def table(done: dict) -> str:
    lines = ["| path | wall s | peak RSS MiB | output |", "|---|---:|---:|---|"]
    for name in STEPS:
        if name in done:
            d = done[name]
            facts = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in d["facts"].items())
            lines.append(f"| {LABELS[name]} | {d['wall']:.2f} | {d['rss']:.0f} | {facts} |")
        else:
            lines.append(f"| {LABELS[name]} | not run | | |")
    ref = [done[n] for n in STEPS[1:] if n in done]
    if 0 < len(ref) < 3 and "ours" in done:
        part = sum(d["wall"] for d in ref)
        lines.append(f"\nreference incomplete: its {len(ref)} timed steps alone take {part:.2f} s, so the speed-up is "
                     f"at least {part / done['ours']['wall']:.2f}x (the missing steps add to it)")
    if len(ref) == 3:
        total = sum(d["wall"] for d in ref)
        lines.append(f"| reference total | {total:.2f} | {max(d['rss'] for d in ref):.0f} | |")
        if "ours" in done:
            lines.append(f"\nspeed-up {total / done['ours']['wall']:.2f}x; peak RSS ratio "
                         f"{max(d['rss'] for d in ref) / done['ours']['rss']:.2f}x")
    runs = sorted({d["run"] for d in done.values()})
    if len(runs) > 1:
        lines.append(f"\nsteps measured in {len(runs)} invocations of this script on the same machine: "
                     + "; ".join(f"{n}: run {runs.index(d['run']) + 1}" for n, d in done.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/merge8b", type=Path)
    ap.add_argument("--tokenizer", default=BENCH / "qlora" / "smollm2", type=Path)
    ap.add_argument("--llama-src", default=LLAMA_SRC, type=Path)
    ap.add_argument("--llama-bin", default=LLAMA_BIN, type=Path)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--stop-at", type=float, default=None,
                    help="skip steps that would end after this UNIX time (by their EXPECTED_S)")
    ap.add_argument("--qf", default=f"{sys.executable} -m quantforge.cli.main",
                    help="how the quantforge command is started (a user's console script: 'quantforge')")
    ap.add_argument("--build-only", action="store_true", help="make the checkpoint and adapter, time nothing")
    ap.add_argument("--device", default="cuda", help="where the checkpoint is made, quantforge merges and PEFT merges")
    ap.add_argument("--layers", type=int, default=LLAMA_8B["num_hidden_layers"], help="fewer for a smoke test")
    ap.add_argument("--check", action="store_true", help="after the steps: the row-chunk merge's bytes (untimed)")
    ap.add_argument("--note", default=None, help="a line printed under the table (how llama-quantize was built)")
    ap.add_argument("--profile", action="store_true", help="after 'ours': its pipeline stage timers (untimed)")
    args = ap.parse_args()
    args.qf = args.qf.split()
    args.llama_src, args.llama_bin = args.llama_src.resolve(), args.llama_bin.resolve()
    import torch

    work = args.dir
    t0 = time.perf_counter()
    ckpt = work / "ckpt"
    if not (work / "peft-merged").exists() and not (work / "ref-bf16.gguf").exists():
        build_checkpoint(ckpt, {**LLAMA_8B, "num_hidden_layers": args.layers}, args.tokenizer, device=args.device)
        write_adapter(ckpt, work / "adapter", args.device)
    shards = sorted(ckpt.glob("*.safetensors"))
    emit(f"checkpoint and adapter ready in {time.perf_counter() - t0:.1f} s "
         f"({sum(p.stat().st_size for p in shards) / 1e9:.2f} GB in {len(shards)} shards)")
    if args.build_only:
        return
    state_file = work / "steps.json"
    done = json.loads(state_file.read_text()) if state_file.is_file() else {}
    run_id = time.strftime("%H:%M:%S")
    for name in [s for s in args.steps.split(",") if s]:
        if args.stop_at is not None and time.time() + EXPECTED_S[name] > args.stop_at:
            emit(f"{name}: skipped (would end past --stop-at)")
            continue
        if name in ("ours", "peft"):
            warm_page_cache(shards)
        try:
            wall, rss, facts = step(name, ckpt, work / "adapter", work, args)
        except SystemExit as exc:  # a failed step is reported; the table of the others still prints
            emit(f"{name}: FAILED: {exc}")
            continue
        done[name] = {"wall": wall, "rss": rss, "facts": facts, "run": run_id}
        state_file.write_text(json.dumps(done, indent=1))
        emit(f"{name}: {wall:.2f} s, peak RSS {rss:.0f} MiB, {facts}")
        if name == "ours" and args.profile:
            if args.stop_at is not None and time.time() + EXPECTED_S["profile"] > args.stop_at:
                emit("profile: skipped (would end past --stop-at)")
            else:
                emit(profile_merge(ckpt, work / "adapter", work, args.device))
        if name == "peft":
            shutil.rmtree(ckpt)  # the reference path needs only the merged copy from here on
    emit()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    emit(f"# merge + export to q4_k_m, Llama-3.1-8B-shaped ({args.layers} layers, random bf16, 4 shards), r={RANK} "
         f"adapter on all seven projections; {gpu}, {os.cpu_count()} cores, llama-quantize "
         f"{args.threads} threads; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    emit(table(done))
    if args.note:
        emit(f"\n{args.note}")
    if args.check:
        if args.stop_at is not None and time.time() + EXPECTED_S["check"] > args.stop_at:
            emit("row-chunk merge check: skipped (would end past --stop-at)")
        else:
            emit(check_row_merge(work, args.tokenizer, args))


if __name__ == "__main__":
    main()
