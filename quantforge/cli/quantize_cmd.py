"""``quantforge quantize MODEL --format gguf|bnb4|hf16 ...``: write one artifact from a checkpoint."""

from __future__ import annotations

from typing import Any

from . import _checks
from ._common import out, progress


def add_parser(sub: Any) -> None:
    p = sub.add_parser("quantize", help="write a GGUF, bitsandbytes 4-bit or 16-bit artifact from a checkpoint")
    p.add_argument("model", help="local HF checkpoint folder or Hub repo id")
    p.add_argument("--format", choices=("gguf", "bnb4", "hf16"), default="gguf",
                   help="gguf: one .gguf file for llama.cpp / Ollama (default); bnb4: a bitsandbytes 4-bit "
                        "checkpoint folder for transformers; hf16: a clean 16-bit safetensors folder")
    p.add_argument("--type", dest="qtype", default=None,
                   help="gguf only: type or mix, f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q3_k_m, q2_k, iq4_xs, "
                        "... (default: f16, or the plan's base type with --plan)")
    p.add_argument("-o", "--output", required=True,
                   help="output file (gguf, e.g. model-q4_k_m.gguf; not a folder) or folder (bnb4, hf16)")
    p.add_argument("--imatrix", default=None, help="importance matrix (llama.cpp GGUF or legacy .dat)")
    p.add_argument("--plan", default=None, help="plan file from 'quantforge plan' (per-tensor types)")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default=None,
                   help="bnb4: 4-bit data type (default: the plan's, else nf4)")
    p.add_argument("--double-quant", action="store_true", default=None,
                   help="bnb4: nested 8-bit quantization of absmax (default: the plan's, else off)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default=None,
                   help="hf16 weights (and bnb4 compute) dtype (default bf16)")
    p.add_argument("--max-shard-size", default=None, help="bnb4/hf16: largest shard, e.g. 500MB, 5GB (default 5GB)")
    p.add_argument("--device", default="cpu",
                   help="gguf: quantize on cpu or cuda[:N]; under torchrun, cuda is each rank's own GPU (LOCAL_RANK)")
    p.add_argument("--devices", default=None,
                   help="gguf: one process driving several devices, e.g. cuda:0,cuda:1 (one thread per device "
                        "encodes tensors; the file is written in order, byte-identical to one device)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    """Under torchrun (``WORLD_SIZE`` > 1) every rank runs this: GGUF tensors are split across the ranks and rank
    0 writes the file; the other formats are written by rank 0 alone."""
    from quantforge import distributed
    from quantforge.errors import InputError

    devices = distributed.parse_devices(args.devices)
    if devices and args.format != "gguf":
        raise InputError(f"--devices applies to --format gguf, not {args.format}")
    check_args(args)
    with distributed.launch(devices[0] if devices else args.device) as group:
        if args.format == "gguf":
            from quantforge.exporters.gguf import export_gguf

            result = export_gguf(args.model, args.output, qtype=args.qtype or "f16", imatrix=args.imatrix,
                                 plan=args.plan, force=args.force, progress=progress, device=args.device,
                                 devices=devices)
        else:
            result = group.on_main(lambda: _write_other(args))
    if group.is_main:
        out(f"wrote {result}")
    return 0


def _write_other(args: Any) -> Any:
    if args.format == "bnb4":
        from quantforge.exporters.bnb4 import export_bnb4

        result = export_bnb4(args.model, args.output, quant_type=args.quant_type, double_quant=args.double_quant,
                             compute_dtype=args.dtype or "bf16", plan=args.plan,
                             max_shard_size=args.max_shard_size or "5GB",
                             force=args.force, progress=progress)
    else:
        from quantforge.exporters.hf16 import export_hf16

        result = export_hf16(args.model, args.output, dtype=args.dtype or "bf16",
                             max_shard_size=args.max_shard_size or "5GB",
                             force=args.force, progress=progress)
    return result


def check_args(args: Any) -> None:
    """Every option, path and plan checked before the model is read: options the format would ignore are refused,
    the output must be a file (gguf) or a folder (bnb4, hf16) and not exist unless ``--force``, the plan must be
    for this format, and the model's config must name a supported architecture."""
    from pathlib import Path

    from quantforge.plan import load_plan
    from quantforge.presets import get_mix

    fmt = args.format
    if fmt == "gguf":
        _checks.not_for(fmt, {"--quant-type": args.quant_type, "--double-quant": args.double_quant,
                              "--dtype": args.dtype, "--max-shard-size": args.max_shard_size})
        if args.qtype is not None:
            get_mix(args.qtype)
        example = f"{Path(str(args.model).rstrip('/')).name}-{args.qtype or 'f16'}.gguf"
        _checks.output_file(args.output, args.force, example=example)
    else:
        _checks.not_for(fmt, {"--type": args.qtype, "--imatrix": args.imatrix})
        if fmt == "hf16":
            _checks.not_for(fmt, {"--plan": args.plan, "--quant-type": args.quant_type,
                                  "--double-quant": args.double_quant})
        _checks.output_folder(args.output, args.force)
    _checks.input_file(args.imatrix, "an importance matrix file (imatrix.gguf or legacy .dat)")
    if args.plan is not None:
        load_plan(args.plan, target=fmt)
    _checks.model(args.model, gguf=fmt == "gguf")
