"""``quantforge eval``: PPL, KL divergence, top-1 agreement and lm-eval tasks for artifacts, plus a CI gate.

    quantforge eval A.gguf B/ --reference MODEL [--tasks arc_easy,piqa] [--limit N] [--ctx 512] [--chunks N]
                    [--text FILE] -o results.json [--baseline old.json --max-kld-increase X --max-acc-drop Y]
    quantforge eval --gate-only results.json --baseline old.json --max-kld-increase X ...

Writes ``results.json`` (schema in ``quantforge.evals.schema``), ``results.md`` and ``results.png``. A gate
failure prints one ``REGRESSION`` line per failed metric and exits 1; bad input exits 2.
"""

from __future__ import annotations

from typing import Any

from . import _checks
from ._common import log, out

DEFAULT_CHUNKS = 8
"""Chunks scored by default: see ``benchmarks/eval_speed.py`` for the time and the ranking it gives."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="score artifacts (PPL, KLD, top-1, lm-eval tasks) and gate regressions",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("artifacts", nargs="*", metavar="ARTIFACT", help=".gguf files, bnb4 folders or checkpoint folders")
    p.add_argument("--reference", metavar="MODEL", help="the 16-bit model every artifact is compared with")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval tasks (default: none). hellaswag, arc_easy, "
                   "arc_challenge, piqa, winogrande, lambada_openai run offline from the local data; any other "
                   "lm-eval task needs the Hub and --task-source hub")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per PPL/KLD chunk (llama-perplexity's 512)")
    p.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS,
                   help=f"number of --ctx chunks to score (default {DEFAULT_CHUNKS}: under a minute of CPU for a 135M "
                        "model, enough to rank quant types that differ clearly; more chunks shrink the standard "
                        "errors for close ones; 0 = the whole text, WikiText-2 test is 570+ chunks)")
    p.add_argument("--text", default=None, help="text for PPL/KLD (default: WikiText-2 test from the data folder)")
    p.add_argument("-o", "--output", help="results JSON path; .md and .png are written beside it")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the cached reference logits and task results "
                        "($QUANTFORGE_CACHE/eval, default ~/.cache/quantforge/eval)")
    p.add_argument("--engine", choices=("llama.cpp", "torch"), default=None,
                   help="GGUF engine: llama.cpp (default) or torch (our exact dequantization as an HF model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "auto"),
                   help="compute dtype of HF models (default float32)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of llama.cpp and torch (default: the "
                   "cores idle at the start, at least 1, at most 8: on a busy machine one thread is much faster than "
                   "two)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward for HF models")
    p.add_argument("--seed", type=int, default=1234, help="seed for lm-eval sampling and few-shot order")
    p.add_argument("--task-source", choices=("auto", "local", "hub"), default="auto",
                   help="local: offline task copies; hub: lm-eval's own tasks (downloads); auto: local if data exists")
    p.add_argument("--no-flash-attn", action="store_true",
                   help="llama.cpp engine without flash attention (llama.cpp's tools use it by default)")
    p.add_argument("--llamacpp-base", action="store_true",
                   help="pass the reference through llama-perplexity's 16-bit log-prob storage (bit-level comparison)")
    g = p.add_argument_group("regression gate")
    g.add_argument("--baseline", metavar="OLD_JSON", help="results file to compare with")
    g.add_argument("--gate-only", metavar="RESULTS_JSON",
                   help="compare an existing results file with --baseline without running models "
                   "(with -o, also write it with the gate added)")
    g.add_argument("--max-kld-increase", type=float, default=None, help="allowed rise of kld_mean (nats)")
    g.add_argument("--max-acc-drop", type=float, default=None, help="allowed fall of each task accuracy (0.02 = 2 pts)")
    g.add_argument("--max-top1-drop", type=float, default=None, help="allowed fall of top-1 agreement")
    g.add_argument("--max-ppl-increase", type=float, default=None, help="allowed relative rise of PPL (0.01 = 1%%)")
    p.set_defaults(func=run)


def _log(msg: str) -> None:
    if msg.startswith("  chunk "):
        log().debug(msg)
    else:
        log().info(msg)


def _limits(args: Any) -> Any:
    from quantforge.evals.gate import Limits

    return Limits(args.max_kld_increase, args.max_acc_drop, args.max_top1_drop, args.max_ppl_increase)


def _apply_gate(results: dict[str, Any], baseline: dict[str, Any], baseline_path: str, limits: Any) -> Any:
    from quantforge.evals.gate import compare

    gate = compare(results, baseline, limits)
    results["gate"] = gate.to_dict(baseline_path, limits)
    return gate


def _finish(gate: Any, baseline_path: str) -> int:
    from quantforge.errors import RegressionError

    if gate is None:
        return 0
    if gate.passed:
        _log(f"gate passed against {baseline_path} ({len(gate.compared)} artifact(s) compared)")
        return 0
    for f in gate.failures:
        log().warning(f.line())
    first = gate.failures[0]
    raise RegressionError(f"{len(gate.failures)} regression(s) against {baseline_path}; first: {first.artifact} "
                          f"{first.metric} {first.value} beyond limit {first.limit:.6g}")


def run(args: Any) -> int:
    from quantforge.errors import InputError
    from quantforge.evals import report, schema
    from quantforge.io import check_output

    limits = _limits(args)
    if args.gate_only:
        if args.artifacts or args.reference:
            raise InputError("--gate-only compares two results files; do not name artifacts or --reference")
        if not args.baseline:
            raise InputError("--gate-only needs --baseline OLD_JSON")
        results = schema.load(args.gate_only)
        baseline = schema.load(args.baseline)
        gate = _apply_gate(results, baseline, args.baseline, limits)
        if args.output:
            report.write_json(results, args.output, force=args.force)
            log().info(f"wrote {args.output} (results with the gate)")
        return _finish(gate, args.baseline)

    if not args.artifacts:
        raise InputError("name at least one ARTIFACT (or use --gate-only RESULTS_JSON)")
    if not args.reference:
        raise InputError("--reference MODEL is required: KLD and top-1 are measured against it")
    if not args.output:
        raise InputError("-o results.json is required")
    if limits.any() and not args.baseline:
        raise InputError("gate limits were given without --baseline OLD_JSON")
    baseline = schema.load(args.baseline) if args.baseline else None
    if baseline is not None and not limits.any():
        raise InputError("--baseline needs at least one limit (--max-kld-increase, --max-acc-drop, ...)")
    check_args(args)
    for p in report.output_paths(args.output):
        check_output(p, args.force)
    threads = args.threads
    if threads is None and args.device == "cpu":
        from quantforge.evals.threads import default_threads

        threads = default_threads()
        _log(f"threads: {threads} (the idle cores now; --threads N to choose)")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    from quantforge.evals.runner import EvalSettings, evaluate

    settings = EvalSettings(
        tasks=[t for t in args.tasks.split(",") if t.strip()], limit=args.limit, n_ctx=args.ctx,
        n_chunks=args.chunks or None, text=args.text, seed=args.seed, engine=args.engine, device=args.device,
        dtype=args.dtype, n_threads=threads, batch_size=args.batch_size, task_source=args.task_source,
        llamacpp_base=args.llamacpp_base, engine_opts={"flash_attn": False} if args.no_flash_attn else {},
    )
    results = evaluate(args.artifacts, args.reference, settings, log=_log, use_cache=not args.no_cache)
    gate = _apply_gate(results, baseline, args.baseline, limits) if baseline is not None else None
    json_path, md_path, png_path = report.write(results, args.output, force=args.force)
    out(report.markdown_table(results))
    _log(f"wrote {json_path}, {md_path}, {png_path}")
    if args.chunks:
        _log(f"scored {results['settings']['n_chunks']} chunks of {args.ctx} tokens; for smaller standard errors "
             f"ask for more with --chunks N (--chunks 0: the whole text)")
    return _finish(gate, args.baseline)


def check_args(args: Any) -> None:
    """Everything checked before a model is loaded: numbers, every artifact and the reference exist and are of a
    known kind, the text file, the tasks (offline ones only, unless --task-source hub), the optional packages
    the run needs, and the outputs. A mistake costs a second, not the reference pass."""
    import importlib.util

    from quantforge.errors import InputError, MissingExtra
    from quantforge.evals import report
    from quantforge.evals.engines import artifact_kind

    _checks.positive("--ctx", args.ctx)
    if args.ctx < 4 or args.ctx % 2:
        raise InputError(f"--ctx must be an even number >= 4; got {args.ctx}")
    _checks.positive("--chunks", args.chunks, allow_zero=True)
    _checks.positive("--limit", args.limit)
    _checks.positive("--threads", args.threads)
    _checks.positive("--batch-size", args.batch_size)
    kinds = [artifact_kind(a) for a in args.artifacts]
    if args.reference:
        _reference_ok(args.reference)
    _checks.input_file(args.text, "a text file for perplexity/KLD")
    if args.text is None:
        from quantforge.evals.data import wikitext2_test

        wikitext2_test()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if tasks:
        _tasks_ok(tasks, args.task_source)
        if importlib.util.find_spec("lm_eval") is None:
            raise MissingExtra("--tasks", "eval", "lm-eval")
    llama = (args.engine or "llama.cpp") == "llama.cpp"
    if "gguf" in kinds and llama and importlib.util.find_spec("llama_cpp") is None:
        raise MissingExtra("evaluating a .gguf with the llama.cpp engine (or pass --engine torch)", "eval",
                           "llama-cpp-python")
    if "bnb4" in kinds and importlib.util.find_spec("bitsandbytes") is None:
        raise MissingExtra("evaluating a bnb4 folder", "bnb", "bitsandbytes")
    if args.output:
        if importlib.util.find_spec("matplotlib") is None:
            raise MissingExtra("the quality-vs-size plot", "eval", "matplotlib")
        for p in report.output_paths(args.output):
            _checks.output_file(str(p), args.force)


def _reference_ok(reference: str) -> None:
    """A local reference must be a checkpoint folder with config.json or a .gguf; anything else that is not a
    Hub repo id (ORG/NAME) is refused now rather than after the artifacts are checked."""
    from pathlib import Path

    from quantforge.errors import MissingFile
    from quantforge.evals.engines import artifact_kind

    p = Path(reference)
    if p.exists():
        artifact_kind(p)
        return
    text = str(reference)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise MissingFile("no such reference model (a checkpoint folder, a .gguf or a Hub repo id)", path=p)


def _tasks_ok(tasks: list[str], source: str) -> None:
    """Offline runs (``--task-source auto``/``local``) take only the tasks with local copies; the others need
    lm-eval's own Hub datasets, which ``--task-source hub`` asks for (refused when HF_HUB_OFFLINE is set)."""
    import os

    from quantforge.errors import InputError
    from quantforge.evals.lm_eval_runner import LOCAL_PREFIX, LOCAL_TASKS

    if source == "hub":
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise InputError(f"--task-source hub downloads task data, but HF_HUB_OFFLINE is set; offline tasks are "
                             f"{', '.join(LOCAL_TASKS)}")
        return
    hub_only = [t for t in tasks if t not in LOCAL_TASKS and t.removeprefix(LOCAL_PREFIX) not in LOCAL_TASKS]
    if hub_only:
        raise InputError(f"task(s) {', '.join(hub_only)} have no offline copy and need the Hub (their data is "
                         f"downloaded); offline tasks are {', '.join(LOCAL_TASKS)}; to download, pass "
                         "--task-source hub")
