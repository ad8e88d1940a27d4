"""Time and peak memory to write a bitsandbytes 4-bit checkpoint: quantforge vs transformers + bitsandbytes.

Each side runs in a fresh subprocess (imports included in the wall time):

* ``quantforge``: ``export_bnb4(model, out, quant_type, double_quant)`` (streams one tensor at a time);
* ``transformers``: ``AutoModelForCausalLM.from_pretrained(model, quantization_config=BitsAndBytesConfig(...))``
  then ``save_pretrained(out)``, the way ``*-bnb-4bit`` checkpoints are usually produced.

Peak RSS is the child's ``ru_maxrss``; on CUDA the peak allocated GPU memory is reported too.

    python benchmarks/bnb4_write.py                          # SmolLM2-135M on CPU (fixtures.smollm2("plain"))
    python benchmarks/bnb4_write.py --device cuda --synthetic-llama8b   # random Llama-3.1-8B-shaped weights
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
            "dtype": "bfloat16"}


def make_synthetic_llama8b(out: Path, layers: int) -> Path:
    """Random bf16 weights with Llama-3.1-8B shapes (``layers`` decoder layers), written streaming."""
    import torch
    from quantforge.exporters._shards import TensorSpec, write_json, write_sharded
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(LLAMA_8B, num_hidden_layers=layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)

    def tensors():
        for name, shape in shapes:
            if "norm" in name:
                yield name, torch.ones(shape, dtype=torch.bfloat16)
            else:
                yield name, (torch.randn(shape, generator=gen, device=dev) * 0.02).to(torch.bfloat16).cpu()

    out.mkdir(parents=True, exist_ok=True)
    write_sharded(tensors(), out, "5GB", layout=[[TensorSpec(n, torch.bfloat16, s)] for n, s in shapes])
    write_json(out / "config.json", cfg)
    return out


def child(which: str, model: str, out: str, quant_type: str, double_quant: bool, device: str) -> None:
    start = time.perf_counter()
    import torch

    if which == "quantforge":
        from quantforge.exporters.bnb4 import export_bnb4

        export_bnb4(model, out, quant_type=quant_type, double_quant=double_quant, device=device, force=True)
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                 bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16)
        m = AutoModelForCausalLM.from_pretrained(model, quantization_config=cfg, device_map=device)
        m.save_pretrained(out)
    if device == "cuda":
        torch.cuda.synchronize()
    result = {"seconds": time.perf_counter() - start,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
              "out_mb": sum(p.stat().st_size for p in Path(out).iterdir() if p.suffix == ".safetensors") / 2**20}
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")


def run_child(which: str, args: argparse.Namespace, model: str, out: Path) -> dict:
    cmd = [sys.executable, "-P", __file__, "--child", which, "--model", model, "--out", str(out),
           "--quant-type", args.quant_type, "--device", args.device] + (["--double-quant"] if args.double_quant else [])
    wall = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - wall
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{which} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][7:]), "process_seconds": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the SmolLM2 fixture)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--synthetic-llama8b", action="store_true", help="random Llama-3.1-8B-shaped weights")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the synthetic model")
    ap.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"))
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--runs", type=int, default=1, help="runs per side (the fastest is reported)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.out, args.quant_type, args.double_quant, args.device)
        return
    work = Path(tempfile.mkdtemp(prefix="bnb4_write."))
    try:
        if args.synthetic_llama8b:
            model = str(make_synthetic_llama8b(work / "llama8b", args.layers))
            name = f"synthetic Llama-3.1-8B shapes ({args.layers} layers)"
        else:
            from quantforge import fixtures

            model = args.model or str(fixtures.smollm2("plain"))
            name = Path(model).name
        rows = {}
        for which in ("quantforge", "transformers"):
            runs = [run_child(which, args, model, work / f"out-{which}") for _ in range(args.runs)]
            rows[which] = min(runs, key=lambda r: r["seconds"])
            shutil.rmtree(work / f"out-{which}", ignore_errors=True)
        report(name, args, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(name: str, args: argparse.Namespace, rows: dict) -> None:
    q, t = rows["quantforge"], rows["transformers"]
    gpu = args.device == "cuda"
    mode = f"{args.quant_type}{' + double quant' if args.double_quant else ''}, device {args.device}"
    lines = [f"model: {name}; {mode}; best of {args.runs} run(s), each in a fresh process", "",
             "| writer | wall s (process) | peak RSS MiB" + (" | peak GPU MiB" if gpu else "") + " | output MiB |",
             "|---|---|---|" + ("---|" if gpu else "") + "---|"]
    for label, r in (("quantforge export_bnb4", q), ("transformers from_pretrained + save_pretrained", t)):
        cells = [label, f"{r['seconds']:.1f} ({r['process_seconds']:.1f})", f"{r['peak_rss_mb']:.0f}"]
        if gpu:
            cells.append(f"{r['peak_gpu_mb']:.0f}")
        cells.append(f"{r['out_mb']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    ratio = (f"transformers / quantforge: time x{t['seconds'] / q['seconds']:.2f}, "
             f"peak RSS x{t['peak_rss_mb'] / q['peak_rss_mb']:.2f}")
    if gpu and q["peak_gpu_mb"]:
        ratio += f", peak GPU x{t['peak_gpu_mb'] / q['peak_gpu_mb']:.2f}"
    lines += ["", ratio]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
