"""Multi-GPU scaling: calibration and q4_k_m quantization of a Llama-3.1-8B-shaped random model on one
GPU vs two, with torch.distributed (NCCL). Goal: >= 1.8x on two GPUs.

    torchrun --standalone --nproc_per_node 2 benchmarks/multigpu.py [--out-dir /tmp/mgpu] [--layers 32] [--record]

Every rank runs this script. The one-GPU baselines run on rank 0 alone, inside
``quantforge.distributed.single_process()``, while the other rank waits at a barrier; the two-GPU runs use both
ranks exactly as ``torchrun ... quantforge quantize|calibrate`` does. Then, for the ``--devices`` path, rank 0
alone drives both GPUs with one thread each.

* Quantization reads the synthetic source of ``gpu_quantize.py`` (random bf16 made on each rank's GPU,
  deterministic per tensor and row range), so no 16 GB of weights are read from disk; the GGUF is written to
  ``--out-dir``. The one-GPU, two-GPU and two-thread files must be byte-identical (checked).
* Calibration needs a Hugging Face checkpoint: rank 0 writes a random bf16 one once (16 GB, kept in
  ``--out-dir/ckpt`` for later runs); calibration text is wikitext-2 (``--data``). The imatrices of the one- and
  two-GPU runs are compared (max relative difference printed).

torchrun sets OMP_NUM_THREADS=1 in its workers; the CPU parts of calibration (candidate codecs on CPU) would crawl,
so each phase sets torch's thread count to the cores it may use: all of them for a one-process baseline, an
equal share per rank in the distributed runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import record, table  # noqa: E402
from gpu_quantize import LLAMA_8B, synthetic_source  # noqa: E402

GOAL = 1.8
ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(group: Any, fn: Any) -> float:
    """Wall seconds of ``fn()`` from a common start to the end of the slowest rank (barriers on both sides)."""
    group.barrier()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    group.barrier()
    return time.perf_counter() - t0


def solo(group: Any, fn: Any) -> float:
    """``fn()`` on rank 0 as a one-process run (the other ranks wait); its wall seconds, on every rank."""
    import torch

    from quantforge import distributed

    group.barrier()
    seconds = 0.0
    if group.is_main:
        torch.set_num_threads(os.cpu_count() or 1)
        with distributed.single_process():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            seconds = time.perf_counter() - t0
    group.barrier()
    return float(group.broadcast_object(seconds))


def write_checkpoint(dest: Path, config: dict, tokenizer_dir: Path, device: str) -> Path:
    """A random bf16 Llama checkpoint of ``config`` (made on the GPU, saved in 5 GB shards) with the tokenizer of
    ``tokenizer_dir``; kept for later runs."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (dest / "model.safetensors.index.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(tmp, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, tmp / name)
    (tmp / "quantforge_benchmark.json").write_text(json.dumps({"random": True, "seed": 0}))
    os.replace(tmp, dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default="/tmp/quantforge-multigpu")
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quick functional check")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the SmolLM2 fixture)")
    ap.add_argument("--data", default=None, help="calibration text (default: shared wikitext-2 wiki.valid.raw)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--holdout-tokens", type=int, default=1024)
    ap.add_argument("--chunk-elems", type=int, default=1 << 26)
    ap.add_argument("--skip", choices=("calibrate", "quantize"), action="append", default=[])
    ap.add_argument("--keep", action="store_true", help="keep the GGUF files and calibration folders")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="functional check of this script on CPU (gloo) with a tiny model; timings mean nothing")
    args = ap.parse_args()

    import torch

    from quantforge import distributed

    dev = "cpu" if args.cpu_smoke else "cuda"
    group = distributed.init_from_env(dev, timeout_s=4 * 3600)
    if group.world != 2:
        raise SystemExit("run me with: torchrun --standalone --nproc_per_node 2 benchmarks/multigpu.py")
    cores_per_rank = max(1, (os.cpu_count() or 2) // group.world)
    out = Path(args.out_dir)
    if group.is_main:
        out.mkdir(parents=True, exist_ok=True)
    group.barrier()
    tok = Path(args.tokenizer) if args.tokenizer else None
    if tok is None:
        from quantforge import fixtures

        tok = group.on_main(lambda: fixtures.smollm2("plain"))
    config = {**LLAMA_8B, "num_hidden_layers": args.layers}
    if args.cpu_smoke:
        config.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=49152, num_hidden_layers=2)
        args.tokens, args.holdout_tokens, args.chunk_elems = 1024, 512, 1 << 16
    rows: list[list[object]] = []
    notes: list[str] = []

    if "quantize" not in args.skip:
        from quantforge.exporters.gguf.writer import write_gguf

        def quantize(path: Path, devices: list[str] | None = None) -> Any:
            src = synthetic_source(config, tok, dev)  # "cuda": each rank's (or thread's) current GPU
            return write_gguf(src, path, "q4_k_m", force=True, device=dev, devices=devices,
                              chunk_elems=args.chunk_elems)

        # warm-up on every rank and device (CUDA contexts, Triton compiles), so the first timed run pays nothing extra
        with distributed.single_process():
            warm = {**config, "num_hidden_layers": 1}
            mine = [f"cuda:{group.local_rank}"] + (["cuda:1"] if group.is_main else [])
            for d in (mine if dev == "cuda" else ["cpu"]):
                write_gguf(synthetic_source(warm, tok, dev), out / f"warm-{group.rank}.gguf", "q4_k_m", force=True,
                           device=d, chunk_elems=args.chunk_elems)
            (out / f"warm-{group.rank}.gguf").unlink()
        one = solo(group, lambda: quantize(out / "q4_k_m-1gpu.gguf"))
        torch.set_num_threads(cores_per_rank)
        two = timed(group, lambda: quantize(out / "q4_k_m-2gpu.gguf"))
        threads = solo(group, lambda: quantize(out / "q4_k_m-2threads.gguf", ["cuda:0", "cuda:1"] if dev == "cuda"
                                               else ["cpu", "cpu"]))
        if group.is_main:
            digests = {n: sha256(out / f"q4_k_m-{n}.gguf") for n in ("1gpu", "2gpu", "2threads")}
            same = len(set(digests.values())) == 1
            size = (out / "q4_k_m-1gpu.gguf").stat().st_size / 1e9
            rows.append(["q4_k_m GGUF (end to end, incl. write)", one, two, one / two, threads, one / threads,
                         "yes" if same else "NO"])
            notes.append(f"q4_k_m file {size:.2f} GB, sha256 {digests['1gpu'][:16]}")
            if not args.keep:
                for n in digests:
                    (out / f"q4_k_m-{n}.gguf").unlink()

    if "calibrate" not in args.skip:
        from quantforge.imatrix import load_imatrix
        from quantforge.calibration.pipeline import CalibrationSettings, calibrate

        shared = Path(os.environ.get("QUANTFORGE_DATA", ROOT.parent / "shared" / "data"))
        data = Path(args.data) if args.data else shared / "wikitext-2" / "wiki.valid.raw"
        ckpt_dir = out / f"ckpt-{config['hidden_size']}x{config['num_hidden_layers']}"
        ckpt = group.on_main(lambda: write_checkpoint(ckpt_dir, config, tok, dev))
        settings = dict(tokens=args.tokens, ctx=512, holdout_tokens=args.holdout_tokens)
        if group.is_main:  # the checkpoint's pages in the page cache for both runs alike
            for f in sorted(ckpt.glob("*.safetensors")):
                with open(f, "rb") as fh:
                    while fh.read(1 << 26):
                        pass
            # the setup's dirty pages (16 GB checkpoint, GGUF files) go to disk now, not during a timed run
            # (in the 2-GPU run of 2026-11-23 rank 0 lost ~5 s writing the small imatrix file behind them)
            os.sync()
        import transformers  # noqa: F401  (import time out of both timings)
        stages: dict[str, dict[str, float]] = {}

        def stage_log(items: Any, total: int | None = None, desc: str = "", **_: Any) -> Any:
            if group.is_main:  # when each calibration stage starts, for the log
                print(f"  [{time.strftime('%H:%M:%S')}] {desc} ({total})", flush=True)
            return items

        def run_cal(folder: Path, name: str) -> None:
            r = calibrate(ckpt, [data], folder, CalibrationSettings(**settings), device=dev, force=True,
                          progress=stage_log)
            stages[name] = r.seconds
            if name == "2gpu":  # each rank's own stage times (rank 0's are in the table)
                for k, sec in enumerate(group.all_gather_object(r.seconds)):
                    if group.is_main:
                        notes.append(f"2-GPU calibrate, rank {k} stages: "
                                     + ", ".join(f"{st} {v:.1f} s" for st, v in sec.items()))

        if group.is_main:
            shutil.rmtree(out / "cal-1gpu", ignore_errors=True)
        one = solo(group, lambda: run_cal(out / "cal-1gpu", "1gpu"))
        torch.set_num_threads(cores_per_rank)
        if group.is_main:
            shutil.rmtree(out / "cal-2gpu", ignore_errors=True)
        two = timed(group, lambda: run_cal(out / "cal-2gpu", "2gpu"))
        if group.is_main:
            a, b = load_imatrix(out / "cal-1gpu" / "imatrix.gguf"), load_imatrix(out / "cal-2gpu" / "imatrix.gguf")
            rel = max(float(abs(e.in_sum2 - b.entries[n].in_sum2).max() / max(abs(e.in_sum2).max(), 1e-30))
                      for n, e in a.entries.items())
            rows.append(["calibrate (imatrix + sensitivity, incl. model load)", one, two, one / two, "", "",
                         f"imatrix max rel diff {rel:.1e}"])
            for stage in stages["1gpu"]:
                s1, s2 = stages["1gpu"][stage], stages["2gpu"].get(stage, float("nan"))
                rows.append([f"  calibrate stage: {stage}", s1, s2, s1 / s2 if s2 else float("nan"), "", "", ""])
            if not args.keep:
                shutil.rmtree(out / "cal-1gpu", ignore_errors=True)
                shutil.rmtree(out / "cal-2gpu", ignore_errors=True)

    if group.is_main:
        name = torch.cuda.get_device_name(0) if dev == "cuda" else "CPU process (smoke test)"
        body = table(["work", "1 GPU s", "2 GPUs (torchrun) s", "speedup", "1 process, --devices x2 s", "speedup",
                      "same output"], rows)
        verdict = [f"goal >= {GOAL}x: " + ("met" if all(r[3] >= GOAL for r in rows if isinstance(r[3], float)
                                                          and not str(r[0]).startswith("  ")) else "missed")]
        text = "\n".join([body, "", *notes, *verdict])
        print(f"Llama-3.1-8B-shaped random model, {config['num_hidden_layers']} layers, on 2 x {name}\n")
        print(text)
        if args.record and not args.cpu_smoke:
            cmd = f"torchrun --standalone --nproc_per_node 2 benchmarks/multigpu.py --layers {args.layers}"
            record("Multi-GPU scaling", cmd, f"2 x {name}, {os.cpu_count()} CPU cores", text)
    group.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
