"""GPU: quantize a Llama-3.1-8B-shaped model (random bf16 weights made on the GPU, 32 layers) to q4_k_m and write
the GGUF to disk, end to end; plus per-format kernel throughput in GB/s of input weights.

    python benchmarks/gpu_quantize.py --out /tmp/l8b-q4_k_m.gguf [--tokenizer DIR] [--types q4_k,q6_k,...]

The tokenizer folder (default: the SmolLM2 fixture) only fills the GGUF vocabulary metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


def synthetic_source(config: dict, tokenizer_dir: Path, device: str):
    """A ModelSource look-alike whose tensors are random bf16 made on ``device`` (deterministic per name/rows)."""
    import torch

    from quantforge.model_source import ModelSource, TensorInfo

    h, f, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "lm_head.weight": (config["vocab_size"], h),
              "model.norm.weight": (h,)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})

    class Synthetic(ModelSource):
        def get(self, name, rows=None):
            shape = shapes[name]
            start, stop = rows if rows is not None else (0, shape[0])
            seed = int.from_bytes(hashlib.sha256(f"{name}:{start}".encode()).digest()[:6], "little")
            g = torch.Generator(device=device).manual_seed(seed)
            if len(shape) == 1:
                return 1.0 + 0.1 * torch.rand(shape, generator=g, device=device, dtype=torch.float32)
            out = torch.randn((stop - start, *shape[1:]), generator=g, device=device, dtype=torch.float32)
            return out.mul_(0.02).to(torch.bfloat16)

        def close(self):
            pass

    tensors = {n: TensorInfo(n, s, "BF16", Path("synthetic")) for n, s in shapes.items()}
    return Synthetic(path=tokenizer_dir, config=dict(config), tensors=tensors)


def kernel_throughput(types: list[str], device: str) -> list[list[object]]:
    import torch

    from quantforge.formats import get_format

    rows = []
    w = (torch.randn(14336, 4096, device=device) * 0.02).to(torch.bfloat16)
    imat = torch.rand(4096, device=device) + 0.1
    for name in types:
        fmt = get_format(name)
        for use_imat in (False, True):
            x = w.float()
            fmt.quantize(x, imat if use_imat else None)
            torch.cuda.synchronize()
            reps = 5
            t0 = time.perf_counter()
            for _ in range(reps):
                packed = fmt.quantize(w.float(), imat if use_imat else None)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / reps
            q_gbs = w.numel() * 2 / dt / 1e9
            codec = fmt.load_codec()
            deq = getattr(codec, "dequantize_triton", None)
            d_gbs = float("nan")
            if deq is not None and not use_imat:
                deq(packed, torch.bfloat16)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(20):
                    deq(packed, torch.bfloat16)
                torch.cuda.synchronize()
                d_gbs = w.numel() * 2 / ((time.perf_counter() - t0) / 20) / 1e9
                ref = fmt.dequantize(packed, torch.float32)
                ok = bool(torch.equal(deq(packed, torch.float32), ref))
            else:
                ok = ""
            rows.append([name, "yes" if use_imat else "no", dt * 1e3, q_gbs, d_gbs, ok])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/llama8b-q4_k_m.gguf")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--types", default="q8_0,q6_k,q5_k,q4_k,q3_k,q2_k,iq4_xs,q4_0,q5_0")
    ap.add_argument("--chunk-elems", type=int, default=1 << 26)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quick functional check")
    args = ap.parse_args()
    import torch

    from quantforge.exporters.gguf.writer import write_gguf

    device = args.device
    tok = Path(args.tokenizer) if args.tokenizer else None
    if tok is None:
        from quantforge import fixtures

        tok = fixtures.smollm2("plain")
    src = synthetic_source({**LLAMA_8B, "num_hidden_layers": args.layers}, tok, device)
    n_params = sum(src.numel(n) for n in src.tensors)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = write_gguf(src, args.out, "q4_k_m", force=True, device=device, chunk_elems=args.chunk_elems)
    wall = time.perf_counter() - t0
    size = out.stat().st_size
    print(table(["model", "mix", "params", "end-to-end s (incl. write)", "file GB", "input GB/s (bf16)"],
                [["Llama-3.1-8B-shaped (random, on GPU)", "q4_k_m", f"{n_params / 1e9:.2f}B", wall, size / 1e9,
                  n_params * 2 / wall / 1e9]]))
    print()
    if device != "cuda":
        return
    print(table(["format", "imatrix", "quantize ms (14336x4096)", "quantize GB/s", "triton dequant GB/s",
                 "triton == reference"], kernel_throughput(args.types.split(","), device)))


if __name__ == "__main__":
    main()
