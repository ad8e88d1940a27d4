"""``quantforge merge MODEL ADAPTER_DIR -o OUT``: merge a PEFT LoRA adapter into its base and write one artifact.

The base checkpoint is read through :class:`~quantforge.merged_source.MergedSource`, so the GGUF, bitsandbytes
and 16-bit exporters write the merged model tensor by tensor, as ``quantize`` writes a plain one. With
``--format gguf --device cuda`` the merge runs inside the GGUF export pipeline: its readers read the 16-bit base
rows, the GPU adds the LoRA delta to each row chunk and quantizes it, as ``quantize`` does with a plain chunk.
"""

from __future__ import annotations

from typing import Any

from ._common import out, progress


def add_merge_args(p: Any) -> None:
    """The merge options ``merge`` and ``export`` share."""
    p.add_argument("--base", choices=("original", "quantized"), default="original",
                   help="add the LoRA delta to the original 16-bit weights, or to the quantized weights the adapter "
                        "was trained against (see --base-type)")
    p.add_argument("--base-type", default="nf4",
                   help="with --base quantized: the format of the training base (nf4, fp4, or a GGUF type)")
    p.add_argument("--no-base-double-quant", dest="base_double_quant", action="store_false",
                   help="with --base quantized nf4/fp4: the training base had no nested absmax quantization")
    p.add_argument("--device", default="cpu", help="merge (and GGUF-quantize) on cpu or cuda[:N]")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("merge", help="merge a PEFT LoRA adapter into its base model and write GGUF, bnb4 or hf16")
    p.add_argument("model", help="base checkpoint folder (16-bit safetensors) or Hub repo id")
    p.add_argument("adapter", help="PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("-o", "--output", required=True, help="output file (gguf) or folder (bnb4, hf16)")
    p.add_argument("--format", choices=("gguf", "bnb4", "hf16"), default="gguf")
    p.add_argument("--type", dest="qtype", default=None, help="GGUF type or mix (f16, q8_0, q4_k_m, ...)")
    p.add_argument("--plan", default=None, help="plan file from 'quantforge plan' (per-tensor types)")
    p.add_argument("--imatrix", default=None, help="gguf: importance matrix")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default=None, help="bnb4: 4-bit data type")
    p.add_argument("--double-quant", action="store_true", default=None, help="bnb4: nested absmax quantization")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="hf16 (and bnb4 compute) dtype; fp32 keeps the merged weights unrounded")
    p.add_argument("--max-shard-size", default="5GB", help="bnb4/hf16: largest shard")
    add_merge_args(p)
    p.add_argument("--base-gguf", default=None, metavar="FILE",
                   help="take the base weights from this GGUF (the file the adapter was trained on with 'quantforge "
                        "train --base-gguf' or '--base-format gguf --plan'); overrides --base")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=run)


def open_merged(args: Any) -> Any:
    from quantforge.merged_source import MergedSource

    return MergedSource.open_merged(args.model, args.adapter, base=args.base, base_format=args.base_type,
                                    double_quant=args.base_double_quant, device=args.device,
                                    base_gguf=getattr(args, "base_gguf", None))


def run(args: Any) -> int:
    result = write_merged(args, open_merged(args))
    out(f"wrote {result}")
    return 0


def write_merged(args: Any, src: Any) -> Any:
    """Write the merged model behind ``src`` in ``args.format``."""
    from quantforge.io import check_output

    check_output(args.output, args.force)
    try:
        if args.format == "gguf":
            from quantforge.exporters.gguf.writer import write_gguf

            return write_gguf(src, args.output, qtype=args.qtype or "f16", imatrix=args.imatrix, plan=args.plan,
                              force=args.force, progress=progress, device=args.device)
        if args.format == "bnb4":
            from quantforge.exporters.bnb4 import export_bnb4

            return export_bnb4(src, args.output, quant_type=args.quant_type, double_quant=args.double_quant,
                               compute_dtype=args.dtype, plan=args.plan, max_shard_size=args.max_shard_size,
                               force=args.force, progress=progress)
        from quantforge.exporters.hf16 import export_hf16

        return export_hf16(src, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force,
                           progress=progress)
    finally:
        src.close()
