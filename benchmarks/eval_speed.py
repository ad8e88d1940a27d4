"""Time of ``quantforge eval`` against llama.cpp's ``llama-perplexity`` and the lm-eval harness on the same work.

Model: SmolLM2-135M-Instruct (the bf16 fixture), CPU. Two artifacts written by our quantizer: q4_k_m (the first,
evaluated with the reference computed) and q8_0 (the second, against the reference cached by the first).

- PPL/KLD work (``quantforge eval``'s default): PPL, KL divergence and top-1 agreement on the first ``--chunks``
  512-token chunks of WikiText-2 test. Ours: ``quantforge eval ART --reference MODEL`` (the bf16 checkpoint run
  in float32 by transformers, the GGUF by llama-cpp-python). Anchor: ``llama-perplexity --kl-divergence-base`` on
  the f16 GGUF, then ``--kl-divergence`` on the artifact (the second artifact needs only its own pass).
- Task work (``--tasks``, default ``arc_easy``, ``--limit`` documents): ours adds ``--tasks/--limit`` to the same
  command (reference and artifact). Anchor: the llama-perplexity passes above plus ``lm_eval --model hf`` on the
  same offline task copy, for the reference (``pretrained=MODEL,dtype=float32``) and for the artifact
  (``gguf_file=``: transformers dequantizes the GGUF; lm-eval's own llama.cpp backend needs a running server).

Every step is a fresh process with an empty quantforge cache, timed from outside: wall time and the child's CPU
time (user + sys), with the machine's 1-minute load average at each start (wall time follows the load on a shared
machine; CPU time is the work). Each ``--threads-list`` entry runs everything: ``default`` passes no thread
option to any tool (quantforge then takes the idle cores, llama-perplexity its own default, torch in lm-eval
its own), ``N`` passes ``--threads N`` / ``-t N`` / ``OMP_NUM_THREADS=N``.

    python benchmarks/eval_speed.py --record     # prints the entry; --record also replaces RESULTS.md's section
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH, LLAMA_BIN, ROOT, device_line, table  # noqa: E402

SECTION = "Evaluation speed"
N_CTX = 512
QUANTFORGE = [sys.executable, "-m", "quantforge.cli.main"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONSAFEPATH": "1"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # noqa: T201


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``cmd``; (wall seconds, CPU seconds of the child, stdout then stderr)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **OFFLINE, **(env or {})}, capture_output=True, text=True,
                          cwd=BENCH)
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


# The llama-perplexity equivalent where its binary is not built, run in its own process: ``--anchor base|kld``.

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


class Anchor:
    """llama-perplexity (the binary when built, else its llama-cpp-python reproduction) with fixed settings."""

    def __init__(self, files: dict[str, Path], text: Path, chunks: int, threads: int | None, tmp: Path) -> None:
        self.files, self.base_file = files, tmp / f"base-{threads or 'default'}.kld"
        self.binary = LLAMA_BIN / "llama-perplexity"
        if self.binary.is_file():
            self.common = ["-f", str(text), "-c", str(N_CTX), "--chunks", str(chunks), "-b", str(N_CTX),
                           *(["-t", str(threads)] if threads else [])]
            self.env = {"LD_LIBRARY_PATH": f"{LLAMA_BIN}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        else:
            self.common = [sys.executable, str(Path(__file__).resolve()), "--chunks", str(chunks), "--anchor-threads",
                           str(threads or max(1, min(os.cpu_count() or 1, 8))), "--base-file", str(self.base_file),
                           "--text", str(text)]
            self.env = {}

    def describe(self) -> str:
        if self.binary.is_file():
            return "llama.cpp's own `llama-perplexity` binary (.bench/llama-build)"
        return ("llama-perplexity reproduced through llama-cpp-python (its binary is not built here: same library, "
                "one eval per chunk, base log-probs kept between passes)")

    def base(self) -> tuple[float, float]:
        if self.binary.is_file():
            cmd = [str(self.binary), "-m", str(self.files["f16"]), "--kl-divergence-base", str(self.base_file),
                   *self.common]
        else:
            cmd = [*self.common, "--anchor", "base", "--gguf", str(self.files["f16"])]
        wall, cpu, _ = timed(cmd, self.env)
        return wall, cpu

    def kld(self, qtype: str) -> tuple[float, float, dict[str, float]]:
        if self.binary.is_file():
            from eval_table import parse_llama_perplexity

            cmd = [str(self.binary), "-m", str(self.files[qtype]), "--kl-divergence-base", str(self.base_file),
                   "--kl-divergence", *self.common]
            for attempt in (1, 2):
                wall, cpu, out = timed(cmd, self.env)
                try:
                    return wall, cpu, parse_llama_perplexity(out)
                except RuntimeError:
                    if attempt == 2:
                        raise
                    # seen once on the loaded machine: exit 0 with the last lines of its log missing
                    log("llama-perplexity printed no summary; running it again")
        wall, cpu, out = timed([*self.common, "--anchor", "kld", "--gguf", str(self.files[qtype])], self.env)
        return wall, cpu, json.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))


def lm_eval(model_args: str, task: str, limit: int, out: Path, threads: int | None) -> tuple[float, float, float]:
    """``lm_eval --model hf`` on our offline copy of ``task``: (wall, CPU, accuracy)."""
    from quantforge.evals.lm_eval_runner import TASKS_DIR

    name = f"qf_{task}"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", name,
           "--include_path", str(TASKS_DIR), "--limit", str(limit), "--output_path", str(out), "--device", "cpu"]
    wall, cpu, _ = timed(cmd, {"OMP_NUM_THREADS": str(threads)} if threads else None)
    written = sorted(out.rglob("results_*.json"))
    acc = json.loads(written[-1].read_text())["results"][name]["acc,none"]
    return wall, cpu, acc


def ours(files: dict[str, Path], qtype: str, model: Path, chunks: int, threads: int | None, task_args: list[str],
         cache: Path, out: Path) -> dict:
    """One ``quantforge eval`` process: wall, CPU, the artifact's metrics, whether the reference came from the
    cache and the thread count it used."""
    cmd = [*QUANTFORGE, "eval", str(files[qtype]), "--reference", str(model), "--chunks", str(chunks),
           *(["--threads", str(threads)] if threads else []), *task_args, "-o", str(out)]
    wall, cpu, text = timed(cmd, {"QUANTFORGE_CACHE": str(cache)})
    log(f"  {wall:.1f} s wall, {cpu:.1f} s CPU")
    doc = json.loads(out.read_text())
    picked = re.search(r"threads: (\d+) \(the idle cores", text)
    return {"wall": wall, "cpu": cpu, "metrics": doc["artifacts"][0]["metrics"],
            "cached": doc["settings"]["reference_from_cache"],
            "threads": int(picked.group(1)) if picked else threads}


def run_setting(threads: int | None, files: dict[str, Path], model: Path, text: Path, chunks: int, task: str,
                limit: int, tmp: Path, load: list[float]) -> tuple[list[list[object]], list[str]]:
    """Every measurement at one thread setting: table rows and summary lines."""
    label = str(threads) if threads else "default"
    tag = f"[threads {label}]"
    anchor_ = Anchor(files, text, chunks, threads, tmp)
    res: dict[str, dict] = {}
    works = [("ppl", [])] + ([("task", ["--tasks", task, "--limit", str(limit)])] if task else [])
    for work, task_args in works:
        cache = tmp / f"cache-{label}-{work}"
        for qtype in ("q4_k_m", "q8_0"):
            log(f"{tag} quantforge eval {qtype} ({work})")
            load.append(os.getloadavg()[0])
            res[f"{work}-{qtype}"] = ours(files, qtype, model, chunks, threads, task_args, cache,
                                          tmp / f"ours-{label}-{work}-{qtype}.json")
    log(f"{tag} llama-perplexity --kl-divergence-base")
    load.append(os.getloadavg()[0])
    base = anchor_.base()
    log(f"  {base[0]:.1f} s wall, {base[1]:.1f} s CPU")
    kld = {}
    for qtype in ("q4_k_m", "q8_0"):
        log(f"{tag} llama-perplexity --kl-divergence ({qtype})")
        kld[qtype] = anchor_.kld(qtype)
        log(f"  {kld[qtype][0]:.1f} s wall, {kld[qtype][1]:.1f} s CPU")
    lm: dict[str, tuple[float, float, float]] = {}
    if task:
        for key, margs in (("ref", f"pretrained={model},dtype=float32"),
                           ("q4_k_m", f"pretrained={files['q4_k_m'].parent},gguf_file={files['q4_k_m'].name},"
                                      "dtype=float32"),
                           ("q8_0", f"pretrained={files['q8_0'].parent},gguf_file={files['q8_0'].name},"
                                    "dtype=float32")):
            log(f"{tag} lm_eval {key}")
            load.append(os.getloadavg()[0])
            lm[key] = lm_eval(margs, task, limit, tmp / f"lm-{label}-{key}", threads)
            log(f"  {lm[key][0]:.1f} s wall, {lm[key][1]:.1f} s CPU, acc {lm[key][2]:.3f}")
    picked = res["ppl-q4_k_m"]["threads"]
    shown = f"{label} ({picked})" if not threads else label
    rows, lines = [], []
    for work, _ in works:
        for i, qtype in enumerate(("q4_k_m", "q8_0")):
            o = res[f"{work}-{qtype}"]
            t_wall, t_cpu = kld[qtype][0], kld[qtype][1]
            if i == 0:
                t_wall, t_cpu = t_wall + base[0], t_cpu + base[1]
            if work == "task":
                parts = [lm[qtype]] + ([lm["ref"]] if i == 0 else [])
                t_wall += sum(p[0] for p in parts)
                t_cpu += sum(p[1] for p in parts)
            what = ("PPL/KLD" if work == "ppl" else f"PPL/KLD + {task} x{limit}") + (
                f", 1st artifact {qtype}, reference computed" if i == 0 else
                f", 2nd artifact {qtype}, reference {'cached' if o['cached'] else 'NOT cached'}")
            m = o["metrics"]
            rows.append([shown, what, f"{o['wall']:.1f}", f"{o['cpu']:.1f}", f"{t_wall:.1f}", f"{t_cpu:.1f}",
                         f"{o['wall'] / t_wall:.2f}", f"{o['cpu'] / t_cpu:.2f}",
                         f"{m['kld_mean']:.5f} ± {m['kld_err']:.5f}", f"{kld[qtype][2]['kld_mean']:.5f}",
                         f"{m['ppl']:.4f}", f"{kld[qtype][2]['ppl']:.4f}",
                         f"{m[task + '_acc']:.3f}" if work == "task" else "",
                         f"{lm[qtype][2]:.3f}" if work == "task" else ""])
        first, second = res[f"{work}-q4_k_m"], res[f"{work}-q8_0"]
        lines.append(f"threads {shown}, {'PPL/KLD' if work == 'ppl' else 'with ' + task}: first artifact "
                     f"{first['wall']:.1f} s wall, {first['cpu']:.1f} s CPU; second / first = "
                     f"{second['wall'] / first['wall']:.2f} wall, {second['cpu'] / first['cpu']:.2f} CPU.")
    return rows, lines


def entry(command: str, body: str) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"### {stamp}\n\n- command: `{command}`\n- device: {device_line()}\n\n{body}\n"


def replace_section(text: str) -> None:
    """Make ``text`` the only entry of this benchmark's section of RESULTS.md (created at the end if missing)."""
    path = ROOT / "benchmarks" / "RESULTS.md"
    doc = path.read_text()
    heading = f"## {SECTION}"
    if heading not in doc:
        path.write_text(doc.rstrip("\n") + f"\n\n{heading}\n\n{text}")
        return
    start = doc.index(heading) + len(heading)
    nxt = doc.find("\n## ", start)
    end = len(doc) if nxt == -1 else nxt + 1
    path.write_text(doc[:start] + "\n\n" + text + ("\n" if nxt != -1 else "") + doc[end:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=None, help="chunks (default: quantforge eval's default)")
    ap.add_argument("--threads-list", default="default,1",
                    help="thread settings to measure, comma-separated: default (each tool chooses) or a number")
    ap.add_argument("--tasks", default="arc_easy", help="one offline task for the task rows ('' to skip them)")
    ap.add_argument("--limit", type=int, default=50, help="documents of the task")
    ap.add_argument("--record", action="store_true", help="replace this benchmark's section of benchmarks/RESULTS.md")
    ap.add_argument("--anchor", choices=("base", "kld"), help=argparse.SUPPRESS)
    ap.add_argument("--anchor-threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--base-file", help=argparse.SUPPRESS)
    ap.add_argument("--text", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from quantforge.evals.data import wikitext2_test

    from quantforge.cli.eval_cmd import DEFAULT_CHUNKS

    chunks = args.chunks or DEFAULT_CHUNKS
    if args.anchor:
        anchor(args.anchor, Path(args.gguf), Path(args.base_file), Path(args.text), chunks, args.anchor_threads)
        return
    if "," in args.tasks:
        raise SystemExit("--tasks takes one task")
    settings = [None if s.strip() == "default" else int(s) for s in args.threads_list.split(",") if s.strip()]

    from quantforge import fixtures

    model = fixtures.smollm2("plain")
    work = BENCH / "eval_speed"
    work.mkdir(parents=True, exist_ok=True)
    files = artifacts(model, work)
    text = wikitext2_test()
    rows: list[list[object]] = []
    lines: list[str] = []
    load: list[float] = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for threads in settings:
            r, s = run_setting(threads, files, model, text, chunks, args.tasks, args.limit, Path(tmp), load)
            rows += r
            lines += s
        described = Anchor(files, text, chunks, None, Path(tmp)).describe()
    header = ["threads", "work", "quantforge eval wall s", "CPU s", "anchor wall s", "CPU s", "ours / anchor wall",
              "CPU", "KLD ours ± err", "KLD llama.cpp", "PPL ours", "PPL llama.cpp", "acc ours", "acc lm_eval"]
    body = "\n".join([
        table(header, rows), "",
        f"Work: SmolLM2-135M-Instruct, {chunks} chunks x {N_CTX} tokens of WikiText-2 test "
        f"({chunks * (N_CTX // 2 - 1)} scored tokens)" + (f"; task rows add lm-eval {args.tasks}, {args.limit} "
                                                           "documents (offline copy)" if args.tasks else "")
        + ". Threads `default (N)`: no thread option to any tool, quantforge took N (the idle cores at its start). "
        "1-minute load average at the starts: " + ", ".join(f"{x:.1f}" for x in load) + ".",
        *lines,
        "Goals: first artifact < 90 s wall on this machine; second / first < 0.5. Wall time on a shared machine "
        "follows the load; CPU time is the work.",
        f"Anchor: {described}, its reference the f16 GGUF; the second artifact's anchor is its own "
        "--kl-divergence pass (the base file is reused)" + (", plus `lm_eval --model hf` (reference in float32; "
                                                            "artifact through `gguf_file`, dequantized by "
                                                            "transformers) on the same task copy and limit; the "
                                                            "second needs only the artifact's lm_eval run"
                                                            if args.tasks else "")
        + ". Ours: the bf16 checkpoint in float32 through transformers, the GGUF through llama-cpp-python (its "
        "task accuracy can differ a little from lm_eval's, which runs the GGUF's weights dequantized in float32).",
    ])
    cmd = "python benchmarks/eval_speed.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("chunks", args.chunks),
                                                     ("threads_list", args.threads_list
                                                      if args.threads_list != "default,1" else None),
                                                     ("tasks", args.tasks if args.tasks != "arc_easy" else None),
                                                     ("limit", args.limit if args.limit != 50 else None)) if v)
    if args.tasks == "":
        cmd += " --tasks ''"
    text_out = entry(cmd + (" --record" if args.record else ""), body)
    print(text_out)  # noqa: T201
    if args.record:
        replace_section(text_out)


if __name__ == "__main__":
    main()
