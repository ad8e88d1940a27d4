"""``quantforge export --to ollama --eval``: score the exported GGUF against the fine-tuned model it came from.

The reference is base + adapter merged onto the original 16-bit weights and kept in float32 (no rounding), written
to a scratch folder inside the export's temporary folder and removed after the reference pass. The exported GGUF
(or, with ``--separate-adapter``, the base GGUF with the adapter GGUF applied by llama.cpp) is scored with
``quantforge eval``'s machinery: perplexity, KL divergence and top-1 agreement on WikiText-2 chunks. The results
go beside the Modelfile as ``results.json`` (the eval schema, so ``quantforge publish`` reads it) and
``results.md``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from . import _checks
from ._common import log, progress
from .eval_cmd import DEFAULT_CHUNKS

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
REFERENCE_DIR = ".eval-reference"


def add_eval_args(p: Any) -> None:
    """The ``--eval`` options of ``export``."""
    g = p.add_argument_group("evaluation (--to ollama)")
    g.add_argument("--eval", action="store_true",
                   help="score the exported model against base + adapter in float32 (PPL, KL divergence, top-1, "
                        "as 'quantforge eval' does) and write results.json and results.md beside the Modelfile; "
                        "the reference is written to disk for the run (4 bytes per weight)")
    g.add_argument("--eval-chunks", type=int, default=DEFAULT_CHUNKS, metavar="N",
                   help=f"--eval: number of --eval-ctx chunks of the text (default {DEFAULT_CHUNKS}; 0 = all)")
    g.add_argument("--eval-ctx", type=int, default=512, metavar="N", help="--eval: tokens per chunk")
    g.add_argument("--eval-text", default=None, metavar="FILE", help="--eval: text file (default: WikiText-2 test)")
    g.add_argument("--eval-threads", type=int, default=None, metavar="N",
                   help="--eval: CPU threads of llama.cpp and torch")


def check_eval_args(args: Any) -> None:
    """Everything ``--eval`` needs, checked before any model is loaded or file written."""
    import importlib.util

    from quantforge.errors import InputError, MissingExtra

    if not args.eval:
        return
    if args.to != "ollama":
        raise InputError("--eval scores an Ollama export; --to lora-gguf writes the adapter alone (score it with "
                         "'quantforge eval' on a base GGUF)")
    _checks.positive("--eval-chunks", args.eval_chunks, allow_zero=True)
    _checks.positive("--eval-ctx", args.eval_ctx)
    if args.eval_ctx < 4 or args.eval_ctx % 2:
        raise InputError(f"--eval-ctx must be an even number >= 4; got {args.eval_ctx}")
    _checks.positive("--eval-threads", args.eval_threads)
    _checks.input_file(args.eval_text, "a text file for perplexity/KLD")
    if args.eval_text is None:
        from quantforge.evals.data import wikitext2_test

        wikitext2_test()
    if importlib.util.find_spec("llama_cpp") is None:
        raise MissingExtra("--eval (the exported GGUF runs in llama.cpp)", "eval", "llama-cpp-python")


def evaluate_export(args: Any, adapter: Any, folder: Path, final: Path, model_file: str,
                    adapter_file: str | None) -> dict[str, Any]:
    """Score ``folder/model_file`` (with ``adapter_file`` applied, if any) against base + adapter in float32 and
    write ``results.json`` / ``results.md`` into ``folder``; paths in the results name ``final``, where the folder
    ends up. Returns the results document."""
    from quantforge.evals import report, schema
    from quantforge.evals.runner import EvalSettings, evaluate
    from quantforge.exporters.hf16 import export_hf16
    from quantforge.merged_source import MergedSource

    if args.eval_threads is not None:
        import torch

        torch.set_num_threads(args.eval_threads)
    reference = folder / REFERENCE_DIR
    opts = {"lora_path": str(folder / adapter_file)} if adapter_file else {}
    settings = EvalSettings(n_ctx=args.eval_ctx, n_chunks=args.eval_chunks or None, text=args.eval_text,
                            device=args.device, n_threads=args.eval_threads, engine_opts=opts)
    try:
        src = MergedSource.open_merged(args.model, adapter, base="original", device=args.device)
        try:
            log().info("eval: writing the float32 reference (base + adapter)")
            export_hf16(src, reference, dtype="fp32", progress=progress)
        finally:
            src.close()
        results = evaluate([folder / model_file], reference, settings, log=log().info, use_cache=False)
    finally:
        shutil.rmtree(reference, ignore_errors=True)
    _name_entries(results, args, folder, final, model_file, adapter_file)
    results = schema.validate(results)
    (folder / RESULTS_JSON).write_text(schema.dumps(results), encoding="utf-8")
    (folder / RESULTS_MD).write_text(report.markdown_table(results), encoding="utf-8")
    return results


def _name_entries(results: dict[str, Any], args: Any, folder: Path, final: Path, model_file: str,
                  adapter_file: str | None) -> None:
    """Point the entries at what the user has: the reference is MODEL + ADAPTER (its scratch folder is gone), the
    artifact lives in the final folder. A base + adapter pair is named after both files and sized as both; its path
    is the folder, so ``quantforge publish`` never credits the pair's numbers to the base GGUF alone."""
    ref = results["reference"]
    ref["name"] = f"{Path(args.model).name} + {Path(args.adapter).name} (f32)"
    ref["path"] = str(args.adapter)
    art = results["artifacts"][0]
    if adapter_file:
        art["name"] = f"{model_file} + {adapter_file}"
        art["path"] = str(final)
        art["size_bytes"] += (folder / adapter_file).stat().st_size
    else:
        art["path"] = str(final / model_file)
