"""Time of ``quantforge eval`` against the llama.cpp workflow on the same work (SmolLM2-135M-Instruct, CPU).

The work: PPL, KL divergence and top-1 agreement of one GGUF artifact against the 16-bit model, on the first
``--chunks`` 512-token chunks of WikiText-2 test (llama-perplexity's chunking: second half of each chunk scored),
plus, with ``--tasks``, lm-eval task accuracy of the reference and the artifact.

- Ours, as a user runs it, each a fresh ``quantforge eval`` process with an empty cache: (1) the q4_k_m artifact
  against the bf16 checkpoint (reference logits computed, then cached), (2) a second artifact, q8_0, against the
  same reference (its logits and task results read from the cache).
- Anchor: ``llama-perplexity --kl-divergence-base`` on the f16 GGUF, then ``--kl-divergence`` on the artifact
  (each run again for the second artifact only for its own pass: the base file is reused), plus ``lm_eval``
  (``--model hf``; the GGUF through transformers' ``gguf_file``) when tasks are asked for. llama.cpp's binaries
  are not built on this machine, so the llama-perplexity passes are reproduced through llama-cpp-python (the
  same llama.cpp library: one ``Llama.eval`` per chunk with every position's logits, the base pass keeping the
  scored rows' log-probs as llama-perplexity's base file does); this is stated in the results.

Every step is a separate process timed from outside (wall time, and the CPU time of the child), with the
machine's load average printed beside it: on the shared 2-core machine wall time depends on the load.

    python benchmarks/eval_speed.py --record
    python benchmarks/eval_speed.py --tasks arc_easy --limit 20 --record
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH, LLAMA_BIN, device_line, record, table  # noqa: E402

SECTION = "Evaluation speed (issue 23)"
N_CTX = 512
QUANTFORGE = [sys.executable, "-m", "quantforge.cli.main"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # noqa: T201


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; (wall seconds, CPU seconds of the child, stdout then stderr)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONSAFEPATH": "1", **(env or {})}, capture_output=True,
                          text=True, cwd=BENCH)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout + proc.stderr


def artifacts(model: Path, work: Path) -> dict[str, Path]:
    """q4_k_m, q8_0 and f16 GGUFs of ``model`` written by our quantizer (kept between runs)."""
    out = {}
    for qtype in ("q4_k_m", "q8_0", "f16"):
        path = work / f"smollm2-{qtype}.gguf"
        if not path.is_file():
            subprocess.run([*QUANTFORGE, "quantize", str(model), "--type", qtype, "-o", str(path), "--quiet"],
                           check=True, cwd=BENCH, env={**os.environ, "PYTHONSAFEPATH": "1"})
        out[qtype] = path
    return out


# The llama-perplexity equivalent, run in its own process: ``--anchor base|kld``.

def _chunks(llm, text: str, n_chunks: int) -> list[list[int]]:
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    bos = llm.token_bos()
    out = []
    for i in range(n_chunks):
        chunk = list(tokens[i * N_CTX:(i + 1) * N_CTX])
        chunk[0] = bos
        out.append(chunk)
    return out


def _scored_logprobs(llm, chunk: list[int]):
    import numpy as np
    import torch

    llm.reset()
    llm.eval(chunk)
    rows = np.array(llm.scores[N_CTX // 2:N_CTX - 1], dtype=np.float32)
    return torch.log_softmax(torch.from_numpy(rows).double(), dim=-1)


def anchor(mode: str, gguf: Path, base_file: Path, text_file: Path, n_chunks: int, threads: int) -> None:
    """``base``: every chunk's scored log-probs of the reference GGUF into ``base_file`` (llama-perplexity
    ``--kl-divergence-base``). ``kld``: the artifact's PPL, mean KLD and top-1 against that file
    (``--kl-divergence``); prints one JSON line."""
    import llama_cpp
    import torch

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False)
    chunks = _chunks(llm, text_file.read_text(encoding="utf-8"), n_chunks)
    if mode == "base":
        torch.save([_scored_logprobs(llm, c).float() for c in chunks], base_file)
        return
    base = torch.load(base_file)
    nll, kld, top, n = 0.0, 0.0, 0, 0
    for c, p_log in zip(chunks, base, strict=True):
        q_log = _scored_logprobs(llm, c)
        p_log = p_log.double()
        targets = torch.tensor(c[N_CTX // 2 + 1:])
        nll -= float(q_log[torch.arange(len(targets)), targets].sum())
        keep = p_log > -16.0
        kld += float((p_log.exp() * (p_log - q_log) * keep).sum())
        top += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        n += len(targets)
    print(json.dumps({"ppl": float(torch.exp(torch.tensor(nll / n))), "kld_mean": kld / n, "top1": top / n}))  # noqa: T201


def lm_eval_cmd(model_args: str, tasks: str, limit: int, out: Path) -> list[str]:
    from quantforge.evals.lm_eval_runner import TASKS_DIR

    names = ",".join(f"qf_{t}" for t in tasks.split(","))
    return [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", names,
            "--include_path", str(TASKS_DIR), "--limit", str(limit), "--output_path", str(out), "--device", "cpu"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=None, help="chunks (default: quantforge eval's default)")
    ap.add_argument("--threads", type=int, default=None, help="--threads for both sides (default: each tool's own)")
    ap.add_argument("--tasks", default="", help="lm-eval tasks for both sides, e.g. arc_easy (default none, as "
                                               "quantforge eval's default)")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    ap.add_argument("--anchor", choices=("base", "kld"), help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--base-file", help=argparse.SUPPRESS)
    ap.add_argument("--text", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from quantforge.evals.data import wikitext2_test

    from quantforge.cli.eval_cmd import DEFAULT_CHUNKS

    chunks = args.chunks or DEFAULT_CHUNKS
    threads = args.threads or max(1, min(os.cpu_count() or 1, 8))
    if args.anchor:
        anchor(args.anchor, Path(args.gguf), Path(args.base_file), Path(args.text), chunks, threads)
        return

    from quantforge import fixtures

    model = fixtures.smollm2("plain")
    work = BENCH / "eval_speed"
    work.mkdir(parents=True, exist_ok=True)
    files = artifacts(model, work)
    text = wikitext2_test()
    thread_args = ["--threads", str(args.threads)] if args.threads else []
    task_args = ["--tasks", args.tasks, "--limit", str(args.limit)] if args.tasks else []
    rows, load = [], []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        env = {"QUANTFORGE_CACHE": str(Path(tmp) / "cache")}
        ours = {}
        for i, qtype in enumerate(("q4_k_m", "q8_0")):
            out = Path(tmp) / f"ours-{qtype}.json"
            log(f"quantforge eval {qtype} ({'fresh' if i == 0 else 'cached'} reference)")
            load.append(os.getloadavg()[0])
            wall, cpu, _ = timed([*QUANTFORGE, "eval", str(files[qtype]), "--reference", str(model), "--chunks",
                                  str(chunks), *thread_args, *task_args, "-o", str(out), "--quiet"], env)
            doc = json.loads(out.read_text())
            ours[qtype] = (wall, cpu, doc["artifacts"][0]["metrics"], doc["settings"]["reference_from_cache"])
        base_file = Path(tmp) / "base.kld"
        binary = LLAMA_BIN / "llama-perplexity"
        if binary.is_file():
            common = ["-f", str(text), "-c", str(N_CTX), "--chunks", str(chunks), "-t", str(threads), "-b", str(N_CTX)]
            base_cmd = [str(binary), "-m", str(files["f16"]), "--kl-divergence-base", str(base_file), *common]

            def kld_cmd(q: str) -> list[str]:
                return [str(binary), "-m", str(files[q]), "--kl-divergence-base", str(base_file), "--kl-divergence",
                        *common]
            env = {"LD_LIBRARY_PATH": f"{LLAMA_BIN}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        else:
            anchor_cmd = [sys.executable, str(Path(__file__).resolve()), "--chunks", str(chunks), "--threads",
                          str(threads), "--base-file", str(base_file), "--text", str(text)]
            base_cmd = [*anchor_cmd, "--anchor", "base", "--gguf", str(files["f16"])]

            def kld_cmd(q: str) -> list[str]:
                return [*anchor_cmd, "--anchor", "kld", "--gguf", str(files[q])]
            env = {}
        log(f"llama-perplexity --kl-divergence-base ({'binary' if binary.is_file() else 'llama-cpp-python'})")
        load.append(os.getloadavg()[0])
        base_wall, base_cpu, _ = timed(base_cmd, env)
        theirs = {}
        for qtype in ("q4_k_m", "q8_0"):
            log(f"llama-perplexity --kl-divergence ({qtype})")
            wall, cpu, stdout = timed(kld_cmd(qtype), env)
            if binary.is_file():
                from eval_table import parse_llama_perplexity

                metrics = parse_llama_perplexity(stdout)
            else:
                metrics = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("{")))
            theirs[qtype] = (wall, cpu, metrics)
        lm = {"ref": (0.0, 0.0), "q4_k_m": (0.0, 0.0), "q8_0": (0.0, 0.0)}
        if args.tasks:
            for key, margs in (("ref", f"pretrained={model},dtype=float32"),
                               ("q4_k_m", f"pretrained={work},gguf_file={files['q4_k_m'].name},dtype=float32"),
                               ("q8_0", f"pretrained={work},gguf_file={files['q8_0'].name},dtype=float32")):
                log(f"lm_eval {key}")
                wall, cpu, _ = timed(lm_eval_cmd(margs, args.tasks, args.limit, Path(tmp) / f"lm-{key}"))
                lm[key] = (wall, cpu)
    first_ours, second_ours = ours["q4_k_m"], ours["q8_0"]
    first_theirs = (base_wall + theirs["q4_k_m"][0] + lm["ref"][0] + lm["q4_k_m"][0],
                    base_cpu + theirs["q4_k_m"][1] + lm["ref"][1] + lm["q4_k_m"][1])
    second_theirs = (theirs["q8_0"][0] + lm["q8_0"][0], theirs["q8_0"][1] + lm["q8_0"][1])
    header = ["run", "quantforge eval wall s", "CPU s", "llama.cpp workflow wall s", "CPU s", "ours / theirs (wall)",
              "KLD ours", "KLD theirs", "PPL ours", "PPL theirs"]
    for label, o, t, q in (("first artifact (q4_k_m), reference computed", first_ours, first_theirs, "q4_k_m"),
                           ("second artifact (q8_0), reference cached", second_ours, second_theirs, "q8_0")):
        rows.append([label, round(o[0], 1), round(o[1], 1), round(t[0], 1), round(t[1], 1), round(o[0] / t[0], 2),
                     f"{o[2]['kld_mean']:.5f}", f"{theirs[q][2]['kld_mean']:.5f}", f"{o[2]['ppl']:.4f}",
                     f"{theirs[q][2]['ppl']:.4f}"])
    second_ratio = second_ours[0] / first_ours[0]
    second_cpu_ratio = second_ours[1] / first_ours[1]
    body = table(header, rows) + "\n\n" + "\n".join([
        f"Work: {chunks} chunks x {N_CTX} tokens of WikiText-2 test ({chunks * (N_CTX // 2 - 1)} scored tokens)"
        + (f", lm-eval {args.tasks} limit {args.limit}" if args.tasks else ", no lm-eval tasks (the default)")
        + f"; threads: {args.threads or 'each tool default'}; 1-minute load average at the starts: "
        + ", ".join(f"{x:.1f}" for x in load) + ".",
        f"Second artifact against the cached reference: {second_ratio:.2f} of the first's wall time, "
        f"{second_cpu_ratio:.2f} of its CPU time (reference read from the cache: {second_ours[3]}; goal < 0.5). "
        f"Goal for the first: < 90 s; wall time on this shared machine follows the load, CPU time is the work.",
        ("Anchor: llama.cpp's own `llama-perplexity` binary (.bench/llama-build), its reference the f16 GGUF. "
         if (LLAMA_BIN / "llama-perplexity").is_file() else
         "Anchor: llama.cpp's binaries were not built; its llama-perplexity passes are reproduced through "
         "llama-cpp-python (same library, one eval per chunk, base log-probs kept between passes), its reference "
         "the f16 GGUF. ")
        + "Ours: the bf16 checkpoint in float32 through transformers, the artifact through llama-cpp-python.",
    ])
    print(body)  # noqa: T201
    if args.record:
        cmd = "python benchmarks/eval_speed.py" + "".join(
            f" --{k.replace('_', '-')} {v}" for k, v in (("chunks", args.chunks), ("threads", args.threads),
                                                         ("tasks", args.tasks or None),
                                                         ("limit", args.limit if args.tasks else None)) if v)
        record(SECTION, cmd + " --record", device_line(), body)


if __name__ == "__main__":
    main()
