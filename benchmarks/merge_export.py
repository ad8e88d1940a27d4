"""Merge a LoRA adapter into SmolLM2-135M-Instruct and export q4_k_m GGUF: quantforge against the usual path.

quantforge: ``quantforge merge MODEL ADAPTER --format gguf --type q4_k_m -o OUT`` (one process, streaming).
Reference: PEFT ``merge_and_unload`` + ``save_pretrained`` (bf16), llama.cpp's ``convert_hf_to_gguf.py --outtype
f16``, then ``llama-quantize Q4_K_M`` (llama.cpp as vendored by llama-cpp-python; build it with
``benchmarks/build_llama_cpp.sh``). Every step runs as its own process, measured as a user runs it: wall time and
peak resident memory (``wait4``'s ``ru_maxrss``; this process stays small, as a child's count starts from its
parent's). The adapter (rsLoRA, r=16 on all linear layers, random B) is
made first and not timed.

    .venv/bin/python benchmarks/merge_export.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_SRC = ROOT / ".bench" / "llama.cpp-src"
LLAMA_BIN = ROOT / ".bench" / "llama-build" / "bin"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ADAPTER_SCRIPT = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=%r, use_rslora=True))
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.002)
peft_model.save_pretrained(sys.argv[2])
""" % TARGETS
MERGE_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
PeftModel.from_pretrained(base, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])
"""


def run(cmd: list[str], safe_path: bool = True, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process. ``safe_path``: keep the working folder off
    ``sys.path`` (the repository's ``kernels/`` would shadow the Hub package transformers imports); llama.cpp's
    converter needs its own folder on it. ``env`` adds variables to the child's environment."""
    t0 = time.perf_counter()
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}, **(env or {})}
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty child must never block on a full pipe
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                env={**env, "PYTHONSAFEPATH": "1"} if safe_path else env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if status != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(cmd[:3])} failed: {log.read().decode(errors='replace')[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    from quantforge import fixtures

    model = fixtures.smollm2("plain")
    py = sys.executable
    quantize = LLAMA_BIN / "llama-quantize"
    have_ref = quantize.is_file() and (LLAMA_SRC / "convert_hf_to_gguf.py").is_file()
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / ".bench" if (ROOT / ".bench").is_dir() else None) as tmp_s:
        tmp = Path(tmp_s)
        run([py, "-c", ADAPTER_SCRIPT, str(model), str(tmp / "adapter")])  # in a child: this process stays small,
        # and a child's peak RSS starts from its parent's at fork
        for _ in range(args.repeat):
            ours = run([py, "-m", "quantforge.cli.main", "merge", str(model), str(tmp / "adapter"), "--format",
                        "gguf", "--type", "q4_k_m", "-o", str(tmp / "ours.gguf"), "--force"])
            rows.append(("quantforge merge -> q4_k_m", *ours))
            if not have_ref:
                continue
            steps = [run([py, "-c", MERGE_SCRIPT, str(model), str(tmp / "adapter"), str(tmp / "merged")])]
            for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
                if (model / f).is_file():
                    shutil.copy(model / f, tmp / "merged" / f)
            steps.append(run([py, str(LLAMA_SRC / "convert_hf_to_gguf.py"), str(tmp / "merged"), "--outtype", "f16",
                              "--outfile", str(tmp / "ref-f16.gguf")], safe_path=False))
            steps.append(run([str(quantize), str(tmp / "ref-f16.gguf"), str(tmp / "ref-q4_k_m.gguf"), "Q4_K_M"]))
            for label, (w, m) in zip(("PEFT merge_and_unload + save", "convert_hf_to_gguf.py f16",
                                      "llama-quantize Q4_K_M"), steps, strict=True):
                rows.append((f"  {label}", w, m))
            rows.append(("reference total", sum(w for w, _ in steps), max(m for _, m in steps)))
            shutil.rmtree(tmp / "merged")
    lines: list[str] = []
    lines.append(f"# merge + export to q4_k_m, SmolLM2-135M-Instruct, CPU ({os.cpu_count()} cores, "
                 f"{platform.processor() or platform.machine()}), {datetime.date.today()}, load avg "
                 f"{os.getloadavg()[0]:.1f}")
    lines.append(f"command: {' '.join([Path(py).name, *sys.argv])}")
    if not have_ref:
        lines.append(f"reference path skipped: {quantize} not built (benchmarks/build_llama_cpp.sh)")
    lines.append("| path | wall s | peak RSS MiB |\n|---|---:|---:|")
    for label, w, m in rows:
        lines.append(f"| {label} | {w:.2f} | {m:.0f} |")
    ours = [r for r in rows if r[0].startswith("quantforge")]
    refs = [r for r in rows if r[0] == "reference total"]
    if refs:
        best_ours, best_ref = min(r[1] for r in ours), min(r[1] for r in refs)
        lines.append(f"\nspeed-up (best of {args.repeat}): {best_ref / best_ours:.2f}x; peak memory ratio "
                     f"{max(r[2] for r in refs) / max(r[2] for r in ours):.2f}x")
    print("\n".join(lines))  # noqa: T201 (the table is the script's output)


if __name__ == "__main__":
    main()
