"""HF -> f16 / q8_0 GGUF: quantforge vs llama.cpp's convert_hf_to_gguf.py (vendored in llama-cpp-python's sdist),
wall time and peak RSS in fresh processes on the same machine; plus peak RSS of our exporter on a synthetic
~2 GB checkpoint against the bound 1.5 x largest tensor + interpreter baseline.

    python benchmarks/convert_speed.py [--repeats 3] [--skip-synthetic] [--record]

Needs the llama.cpp source at .bench/llama.cpp-src (unpacked from the llama-cpp-python sdist). The SmolLM2 runs
alternate (ours, convert, ours, convert, ...) ``--repeats`` times per type; the table gives each side's minimum
wall time (the machine may be shared with other jobs) and its largest peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LLAMA_SRC, device_line, measure, record, table  # noqa: E402

QF = [sys.executable, "-P", "-m", "quantforge.cli.main"]


def synthetic_checkpoint(out: Path, tokenizer_dir: Path) -> tuple[Path, int]:
    """A random bf16 Llama checkpoint of about 2 GB; returns (folder, largest tensor bytes)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
           "intermediate_size": 8192, "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 4,
           "vocab_size": 65536, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    g = torch.Generator().manual_seed(0)
    h, f, kv = 2048, 8192, 2048 // 16 * 4
    sd = {"model.embed_tokens.weight": (65536, h), "lm_head.weight": (65536, h), "model.norm.weight": (h,)}
    for i in range(12):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)})
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in sd.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    largest = max(t.numel() * 2 for t in tensors.values())
    return out, largest


def baseline_rss() -> float:
    code = "import torch, numpy, gguf, safetensors; import quantforge.exporters.gguf.writer, quantforge.kernels.q8_0"
    return measure([sys.executable, "-P", "-c", code])[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of each side per type")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = ap.parse_args()
    from quantforge import fixtures

    model = fixtures.smollm2("plain")
    load_start = os.getloadavg()[0]
    convert = LLAMA_SRC / "convert_hf_to_gguf.py"
    # the converter imports its sibling package ``conversion``: put its folder on the path even under ``-P`` /
    # PYTHONSAFEPATH (which keep a script's own folder off sys.path)
    conv_env = {"PYTHONPATH": os.pathsep.join([str(LLAMA_SRC), str(LLAMA_SRC / "gguf-py")]), "NO_LOCAL_GGUF": ""}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in ("f16", "q8_0"):
            ours_runs, their_runs = [], []
            for _ in range(max(1, args.repeats)):
                ours_runs.append(measure([*QF, "quantize", str(model), "--type", outtype, "--force", "-o",
                                          f"{tmp}/ours-{outtype}.gguf"]))
                their_runs.append(measure([sys.executable, str(convert), str(model), "--outtype", outtype,
                                           "--outfile", f"{tmp}/conv-{outtype}.gguf"], env=conv_env))
            ours = (min(r[0] for r in ours_runs), max(r[1] for r in ours_runs))
            theirs = (min(r[0] for r in their_runs), max(r[1] for r in their_runs))
            rows.append(["SmolLM2-135M", outtype, ours[0], theirs[0], ours[0] / theirs[0], ours[1], theirs[1]])
        runs = f" (min of {args.repeats} alternating runs)" if args.repeats > 1 else ""
        body = table(["model", "type", f"ours s{runs}", f"convert_hf_to_gguf s{runs}", "time ratio (ours/theirs)",
                      "ours peak RSS MiB", "convert peak RSS MiB"], rows)
        slower = [r[1] for r in rows if r[4] >= 1.0]
        body += (f"\n\nLoad average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} after the SmolLM2 runs "
                 f"(shared machine). Goal (faster than convert_hf_to_gguf.py for f16 and q8_0): "
                 + ("**met**." if not slower else f"**not met** for {', '.join(slower)}."))
        print(body)
        if not args.skip_synthetic:
            ckpt, largest = synthetic_checkpoint(Path(tmp) / "synthetic", model)
            base = baseline_rss()
            srows = []
            for outtype in ("f16", "q8_0"):
                wall, rss = measure([*QF, "quantize", str(ckpt), "--type", outtype, "-o", f"{tmp}/syn-{outtype}.gguf"])
                bound = 1.5 * largest / 2**20 + base
                srows.append([f"synthetic {sum(p.stat().st_size for p in ckpt.glob('*.safetensors')) / 1e9:.2f} GB",
                              outtype, wall, rss, largest / 2**20, base, bound, "yes" if rss < bound else "NO"])
            sbody = table(["model", "type", "ours s", "peak RSS MiB", "largest tensor MiB", "baseline MiB",
                           "bound MiB (1.5x largest + baseline)", "within bound"], srows)
            print(sbody)
            body += "\n\n" + sbody
    if args.record:
        command = "python benchmarks/convert_speed.py --record"
        command += f" --repeats {args.repeats}" if args.repeats > 1 else ""
        command += " --skip-synthetic" if args.skip_synthetic else ""
        record("HF -> GGUF conversion", command, device_line(), body)


if __name__ == "__main__":
    main()
