"""Export speed as a user sees it: ``quantforge quantize DIR --format gguf --type T --device D`` timed as a
subprocess on a Llama-3.1-8B-shaped checkpoint on local disk (random bf16 safetensors in 4 shards, SmolLM2
tokenizer), with a warm and a cold page cache, peak RSS; llama.cpp's ``convert_hf_to_gguf.py --outtype bf16``
followed by ``llama-quantize`` in the same run as the anchor, and the tensors of both files compared.

    python benchmarks/export_speed.py --dir /tmp/l8b --tokenizer .bench/qlora/smollm2 [--types q4_k_m,q6_k,q8_0]
        [--device cuda] [--cpu-types q4_k_m] [--llama q4_k_m] [--layers 32] [--profile [TYPES]]
        [--cold-types q4_k_m] [--imatrix FILE|synthetic --types iq2_xxs --llama iq2_xxs]

The checkpoint is built once (on the GPU when there is one) and reused. A cold run first drops the page cache
(``/proc/sys/vm/drop_caches`` when permitted, else ``posix_fadvise(DONTNEED)`` on every shard after ``fsync``);
the table names the method used. ``--profile`` adds one in-process run with the stage timers of
:mod:`quantforge.exporters.gguf.pipeline` (read, host->device, encode, device->host, write) for the first type, or
for each type of a comma-separated list.

The i-quant mixes that llama.cpp makes only with an importance matrix (:data:`IMATRIX_MIXES`) take it from
``--imatrix FILE`` (the ``imatrix.gguf`` that ``quantforge calibrate`` writes, e.g. through
``benchmarks/calibrate_speed.py``) or, where only speed is measured, ``--imatrix synthetic`` (one log-normal vector
per tensor); both sides get the same file (``quantize --imatrix``, ``llama-quantize --imatrix``, which reads that
GGUF imatrix format). llama.cpp's converter runs once; each ``--llama`` mix quantizes its bf16 file.
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
from _common import LLAMA_BIN, LLAMA_SRC, measure, table  # noqa: E402

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "bfloat16", "hidden_act": "silu",
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
"""Llama-3.1-8B's shapes (8.03B parameters); SmolLM2's tokenizer fills the vocabulary metadata, padded to 128256."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
QF = [sys.executable, "-P", "-m", "quantforge.cli.main"]
IMATRIX_MIXES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs")
"""Mixes run with ``--imatrix`` on both sides (llama-quantize refuses most of them without one)."""


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for i in range(n):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    return shapes


def build_checkpoint(out: Path, cfg: dict, tokenizer: Path, shards: int = 4, device: str = "cpu",
                     seed: int = 0) -> Path:
    """Random bf16 weights (std 0.02; norms near 1) in ``shards`` safetensors files with an index, the config and
    the tokenizer files; skipped when ``out`` already holds a complete checkpoint of this config."""
    import torch
    from safetensors.torch import save_file

    done = out / "model.safetensors.index.json"
    if done.is_file() and json.loads((out / "config.json").read_text()) == cfg:
        return out
    out.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(cfg)
    names = list(shapes)
    total = sum(_numel(s) for s in shapes.values())
    buckets: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for name in names:  # a tensor goes to the shard where its first byte falls
        buckets[min(shards - 1, acc * shards // total)].append(name)
        acc += _numel(shapes[name])
    groups = [b for b in buckets if b]
    g = torch.Generator(device=device).manual_seed(seed)
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in group:
            s = shapes[name]
            t = (1.0 + 0.1 * torch.rand(s, generator=g, device=device)) if len(s) == 1 else \
                torch.randn(s, generator=g, device=device).mul_(0.02)
            tensors[name] = t.to(torch.bfloat16).cpu()
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    for f in TOKENIZER_FILES:
        if (tokenizer / f).is_file():
            shutil.copy(tokenizer / f, out / f)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    done.write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=1))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def drop_page_cache(paths: list[Path]) -> str:
    """Evict ``paths`` from the page cache; returns how: ``drop_caches`` (whole cache, needs root) or
    ``fadvise`` (those files' clean pages)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def warm_page_cache(paths: list[Path]) -> None:
    """Read every file once so that a warm run finds it in the page cache."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def imatrix_for(qtype: str, imatrix: Path | None, mixes: tuple[str, ...] = IMATRIX_MIXES) -> Path | None:
    """The imatrix a mix is run with: ``imatrix`` for ``mixes`` (required there), else none."""
    if qtype not in mixes:
        return None
    if imatrix is None:
        raise SystemExit(f"{qtype} needs an importance matrix: pass --imatrix FILE (benchmarks/calibrate_speed.py "
                         "writes one with `quantforge calibrate`)")
    return imatrix


def ours(model: Path, qtype: str, out: Path, device: str, env: dict | None = None,
         imatrix: Path | None = None) -> tuple[float, float]:
    extra = ["--imatrix", str(imatrix)] if imatrix is not None else []
    return measure([*QF, "quantize", str(model), "--format", "gguf", "--type", qtype, "--device", device,
                    "-o", str(out), "--force", "--quiet", *extra], env=env)


def llama_convert(model: Path, work: Path) -> tuple[float, float, Path]:
    """``convert_hf_to_gguf.py --outtype bf16``: (s, peak RSS MiB, file). One conversion serves every mix."""
    bf16 = work / "llama-bf16.gguf"
    s, rss = measure([sys.executable, str(LLAMA_SRC / "convert_hf_to_gguf.py"), str(model), "--outtype", "bf16",
                      "--outfile", str(bf16)], env=_llama_env())
    return s, rss, bf16


def llama_quantize(bf16: Path, qtype: str, work: Path, threads: int,
                   imatrix: Path | None = None) -> tuple[float, float, Path]:
    """``llama-quantize`` of the converter's bf16 file (with ``--imatrix`` when given): (s, peak RSS MiB, file)."""
    out = work / f"llama-{qtype}.gguf"
    extra = ["--imatrix", str(imatrix)] if imatrix is not None else []
    s, rss = measure([str(LLAMA_BIN / "llama-quantize"), *extra, str(bf16), str(out), qtype.upper(), str(threads)],
                     env=_llama_env())
    return s, rss, out


def _llama_env() -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(LLAMA_SRC), str(LLAMA_SRC / "gguf-py")]),
            "LD_LIBRARY_PATH": str(LLAMA_BIN)}


def synthetic_imatrix(model: Path, out: Path) -> Path:
    """A log-normal importance vector for every 2-D weight of ``model`` under its GGUF name (1 chunk), written as
    llama.cpp's GGUF imatrix: what the i-quant mixes need when only their speed is measured."""
    import numpy as np

    from quantforge.arch import arch_for, gguf_name
    from quantforge.imatrix import Imatrix, ImatrixEntry, save_imatrix_gguf
    from quantforge.model_source import ModelSource

    src = ModelSource.open(model)
    spec = arch_for(src.model_type)
    rng = np.random.default_rng(0)
    entries = {}
    for name in src.tensors:
        shape = src.tensors[name].shape
        g = gguf_name(spec, name)
        if g is None or len(shape) != 2 or g == "token_embd.weight":
            continue
        v = (rng.random(shape[1]) * np.exp(2 * rng.standard_normal(shape[1]))).astype(np.float32)
        entries[g] = ImatrixEntry(v.reshape(1, -1) * 512, np.array([512.0], dtype=np.float32))
    src.close()
    save_imatrix_gguf(Imatrix(entries, ["synthetic"], 1, 512), out)
    return out


def compare_tensors(a: Path, b: Path) -> tuple[int, int, list[str]]:
    """(tensors, identical, names that differ) between two GGUF files."""
    import gguf
    import numpy as np

    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    diff = [n for n in ta if n not in tb or ta[n].tensor_type != tb[n].tensor_type
            or not np.array_equal(np.asarray(ta[n].data).view(np.uint8), np.asarray(tb[n].data).view(np.uint8))]
    diff += [n for n in tb if n not in ta]
    return len(ta), len(ta) - len([n for n in diff if n in ta]), diff


def profile_run(model: Path, qtype: str, out: Path, device: str, imatrix: Path | None = None) -> str:
    """One in-process export with the pipeline's stage timers; returns their table."""
    from quantforge.exporters.gguf import pipeline
    from quantforge.exporters.gguf.writer import export_gguf

    stats = pipeline.Stats()
    t0 = time.perf_counter()
    with pipeline.collect(stats):
        export_gguf(model, out, qtype=qtype, force=True, device=device, imatrix=imatrix)
    wall = time.perf_counter() - t0
    return stats.table(wall)


def add_checkpoint_args(ap: argparse.ArgumentParser, calibration: bool = False) -> None:
    """The options every 8B-shaped-checkpoint benchmark shares: where the checkpoint lives, its tokenizer, the
    device and the layer count; with ``calibration``, the calibration text and its 64 x 512 tokens."""
    ap.add_argument("--dir", default="/tmp/export-speed")
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / ".bench" / "qlora" / "smollm2"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32)
    if calibration:
        ap.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "wiki.valid.raw")
        ap.add_argument("--tokens", type=int, default=32768)
        ap.add_argument("--ctx", type=int, default=512)


def checkpoint_from_args(args: argparse.Namespace) -> Path:
    """The 8B-shaped checkpoint under ``args.dir`` (``args.layers`` layers), built once (on the GPU when there is
    one) and reused; prints how long building or checking it took."""
    import torch

    t0 = time.perf_counter()
    model = build_checkpoint(Path(args.dir) / "ckpt", {**LLAMA_8B, "num_hidden_layers": args.layers},
                             Path(args.tokenizer), device="cuda" if torch.cuda.is_available() else "cpu")
    print(f"checkpoint {model} ({time.perf_counter() - t0:.1f} s to build/check)", flush=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    add_checkpoint_args(ap)
    ap.add_argument("--types", default="q4_k_m,q6_k,q8_0")
    ap.add_argument("--cold-types", default=None,
                    help="the types also timed with a cold page cache (default: all of --types)")
    ap.add_argument("--cpu-types", default="", help="also time these with --device cpu (all cores)")
    ap.add_argument("--llama", default="", help="mixes to run through llama.cpp's two steps as the anchor")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--profile", nargs="?", const="", default=None,
                    help="stage timers of an in-process run: of the first type, or of each type listed")
    ap.add_argument("--imatrix", default=None,
                    help=f"importance matrix (imatrix.gguf of `quantforge calibrate`) for {', '.join(IMATRIX_MIXES)};"
                         " 'synthetic' writes one log-normal vector per tensor (speed only: both sides get it)")
    ap.add_argument("--imatrix-mixes", default=",".join(IMATRIX_MIXES),
                    help="the mixes run with --imatrix on both sides (q4_k_m here times the imatrix-weighted kernels)")
    ap.add_argument("--check", action="store_true",
                    help="first check on a small checkpoint that the pipelined file equals the serial and CPU files")
    ap.add_argument("--anchor-s", type=float, default=139.0,
                    help="without --llama: llama.cpp's two steps for q4_k_m measured in an earlier run (s)")
    args = ap.parse_args()
    import torch

    work = Path(args.dir)
    if args.check:
        from export_profile import check_bytes

        print(table(["mix", "cpu", f"{args.device} serial", f"{args.device} pipelined", "pipelined 1M chunks",
                     "identical"], check_bytes(work, args.device, Path(args.tokenizer))), flush=True)
    cfg = {**LLAMA_8B, "num_hidden_layers": args.layers}
    gen_dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = build_checkpoint(work / "ckpt", cfg, Path(args.tokenizer), device=gen_dev)
    shards = sorted(model.glob("*.safetensors"))
    gb = sum(p.stat().st_size for p in shards) / 1e9
    print(f"checkpoint {model}: {gb:.2f} GB in {len(shards)} shards ({time.perf_counter() - t0:.1f} s to build/check)",
          flush=True)
    if args.imatrix == "synthetic":
        args.imatrix = synthetic_imatrix(model, work / "synthetic-imatrix.gguf")
        print(f"imatrix: synthetic, {args.imatrix}", flush=True)
    elif args.imatrix is not None:
        args.imatrix = Path(args.imatrix)
    mixes = tuple(t for t in args.imatrix_mixes.split(",") if t)
    rows, outputs = [], {}
    cpu_s: dict[str, float] = {}
    types = [t for t in args.types.split(",") if t]
    cold_types = types if args.cold_types is None else [t for t in args.cold_types.split(",") if t]
    for qtype in types:
        imatrix_for(qtype, args.imatrix, mixes)
    for qtype in types:
        out = work / f"ours-{qtype}.gguf"
        imat = imatrix_for(qtype, args.imatrix, mixes)
        if qtype in cold_types:
            how = drop_page_cache(shards)
            cold, cold_rss = ours(model, qtype, out, args.device, imatrix=imat)
            rows.append([qtype, args.device, f"cold ({how})", cold, cold_rss, out.stat().st_size / 1e9])
        warm_page_cache(shards)
        warm, warm_rss = ours(model, qtype, out, args.device, imatrix=imat)
        outputs[qtype] = out
        rows.append([qtype, args.device, "warm", warm, warm_rss, out.stat().st_size / 1e9])
        if args.device == "cpu":
            cpu_s[qtype] = warm
        print(table(["type", "device", "page cache", "s", "peak RSS MiB", "file GB"],
                    rows[-2 if qtype in cold_types else -1:]), flush=True)
    if args.profile is not None:
        for qtype in [t for t in args.profile.split(",") if t] or types[:1]:
            warm_page_cache(shards)
            print(f"\npipelined export, {qtype}, warm page cache, in-process")
            imat = imatrix_for(qtype, args.imatrix, mixes)
            print(profile_run(model, qtype, work / "profile.gguf", args.device, imat), flush=True)
            (work / "profile.gguf").unlink(missing_ok=True)
    for qtype in [t for t in args.cpu_types.split(",") if t]:
        warm_page_cache(shards)
        out = work / f"ours-cpu-{qtype}.gguf"
        s, rss = ours(model, qtype, out, "cpu", imatrix=imatrix_for(qtype, args.imatrix, mixes))
        same = qtype in outputs and out.read_bytes() == outputs[qtype].read_bytes()
        cpu_s[qtype] = s
        rows.append([qtype, f"cpu ({os.cpu_count()} cores)", "warm", s, rss, out.stat().st_size / 1e9])
        print(f"cpu {qtype}: {s:.1f} s, RSS {rss:.0f} MiB, same bytes as {args.device}: {same}", flush=True)
        out.unlink()
    anchor_rows = []
    llama_types = [t for t in args.llama.split(",") if t]
    if llama_types:
        warm_page_cache(shards)
        c_s, c_rss, bf16 = llama_convert(model, work)
        print(f"llama.cpp convert_hf_to_gguf.py --outtype bf16: {c_s:.1f} s, RSS {c_rss:.0f} MiB", flush=True)
    for qtype in llama_types:
        imat = imatrix_for(qtype, args.imatrix, mixes)
        q_s, q_rss, theirs = llama_quantize(bf16, qtype, work, args.threads, imat)
        n, same, diff = compare_tensors(outputs[qtype], theirs) if qtype in outputs else (0, 0, ["(no ours)"])
        ours_warm = next(r[3] for r in rows if r[0] == qtype and r[2] == "warm" and r[1] == args.device)
        on_cpu = f"{cpu_s[qtype]:.1f} s = {cpu_s[qtype] / (c_s + q_s):.2f}x" if qtype in cpu_s else "-"
        anchor_rows.append([qtype, c_s, q_s, c_s + q_s, max(c_rss, q_rss), ours_warm, (c_s + q_s) / ours_warm,
                            on_cpu, f"{same}/{n}", ", ".join(diff[:6]) + (f" (+{len(diff) - 6})" if len(diff) > 6 else "")
                            or "-"])
        print(table(["type", "convert bf16 s", "llama-quantize s", "llama.cpp total s", "peak RSS MiB",
                     "ours warm s", "speed-up", "ours --device cpu / llama.cpp",
                     "identical tensors", "differ"], anchor_rows[-1:]), flush=True)
        theirs.unlink()
    if llama_types:
        bf16.unlink()
    print()
    print(f"Llama-3.1-8B-shaped ({args.layers} layers, vocab {cfg['vocab_size']}), {gb:.2f} GB bf16 in "
          f"{len(shards)} shards")
    print(table(["type", "device", "page cache", "s", "peak RSS MiB", "file GB"], rows))
    if anchor_rows:
        print()
        print(table(["type", "convert bf16 s", "llama-quantize s", "llama.cpp total s", "peak RSS MiB",
                     "ours warm s", "speed-up", "ours --device cpu / llama.cpp",
                     "identical tensors", "differ"], anchor_rows))
    else:
        print(f"\nanchor: llama.cpp's convert_hf_to_gguf.py --outtype bf16 + llama-quantize q4_k_m, "
              f"{args.anchor_s:.0f} s measured in an EARLIER run on this machine kind (not this run)")
        print(table(["type", "device", "page cache", "ours s", "anchor s (earlier run)", "speed-up"],
                    [[r[0], r[1], r[2], r[3], args.anchor_s, args.anchor_s / r[3]] for r in rows if r[0] == "q4_k_m"]))
    for out in outputs.values():
        out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
