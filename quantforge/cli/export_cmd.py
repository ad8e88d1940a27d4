"""``quantforge export MODEL ADAPTER_DIR --to ollama -o DIR``: a trained LoRA adapter as a folder ``ollama create``
accepts (merged GGUF + Modelfile, or base GGUF + adapter GGUF + Modelfile; with ``--eval``, the exported model's
scores against base + adapter beside them); ``--to lora-gguf -o FILE`` writes the adapter alone as a llama.cpp
GGUF adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import out, progress
from .export_eval import add_eval_args, check_eval_args, evaluate_export
from .merge_cmd import add_merge_args


def add_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="export a PEFT LoRA adapter for Ollama, or as a llama.cpp GGUF adapter")
    p.add_argument("model", help="base checkpoint folder (16-bit safetensors) or Hub repo id")
    p.add_argument("adapter", help="PEFT LoRA adapter folder")
    p.add_argument("--to", choices=("ollama", "lora-gguf"), default="ollama")
    p.add_argument("-o", "--output", required=True, help="ollama: output folder; lora-gguf: output file")
    p.add_argument("--type", dest="qtype", default="q4_k_m", help="GGUF type or mix of the model file")
    p.add_argument("--plan", default=None, help="plan file (per-tensor GGUF types)")
    p.add_argument("--imatrix", default=None, help="importance matrix for the GGUF quantization")
    p.add_argument("--separate-adapter", action="store_true",
                   help="ollama: write the base GGUF and the adapter as its own GGUF (ADAPTER line) instead of "
                        "merging")
    p.add_argument("--adapter-type", choices=("f32", "f16"), default="f32", help="LoRA GGUF tensor type")
    add_merge_args(p)
    add_eval_args(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    from quantforge.adapters import LoraAdapter
    from quantforge.exporters.lora_gguf import export_lora_gguf, lora_tensors
    from quantforge.io import atomic_dir, check_output
    from quantforge.model_source import ModelSource

    check_output(args.output, args.force)
    check_eval_args(args)
    adapter = LoraAdapter.load(args.adapter)
    if args.to == "lora-gguf":
        result = export_lora_gguf(adapter, args.model, args.output, dtype=args.adapter_type, force=args.force)
        out(f"wrote {result}")
        return 0
    from quantforge.exporters.chat_template import translate
    from quantforge.exporters.gguf.writer import write_gguf
    from quantforge.exporters.ollama import chat_template_of, special_tokens, write_modelfile
    from quantforge.merged_source import MergedSource

    src = ModelSource.open(args.model)
    jinja = chat_template_of(src)
    if jinja is not None:
        translate(jinja, special_tokens(src))  # an untranslatable template fails before any GGUF is written
    if args.separate_adapter:
        lora_tensors(adapter, src, args.adapter_type)  # refuses what a llama.cpp adapter cannot carry, up front
        model_src = src
    else:
        model_src = MergedSource.open_merged(args.model, adapter, base=args.base, base_format=args.base_type,
                                             double_quant=args.base_double_quant, device=args.device)
    with atomic_dir(args.output, force=args.force) as tmp:
        try:
            write_gguf(model_src, tmp / "model.gguf", qtype=args.qtype, imatrix=args.imatrix, plan=args.plan,
                       progress=progress, device=args.device)
        finally:
            model_src.close()
        adapter_file = None
        if args.separate_adapter:
            export_lora_gguf(adapter, src, tmp / "adapter.gguf", dtype=args.adapter_type)
            adapter_file = "adapter.gguf"
        write_modelfile(tmp, src, "model.gguf", adapter_file)
        results = (evaluate_export(args, adapter, tmp, Path(args.output), "model.gguf", adapter_file)
                   if args.eval else None)
    if results is not None:
        from quantforge.evals.report import markdown_table

        out(markdown_table(results))
    out(f"wrote {args.output} (ollama create NAME -f {args.output}/Modelfile)")
    return 0
