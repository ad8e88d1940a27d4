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
                   help="gguf only: type or mix, f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q3_k_m, q2_k, q2_k_s, "
                        "iq4_xs, iq3_xxs, iq2_xxs, iq1_m, tq2_0, ... (default: f16, or the plan's base type with "
                        "--plan)")
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
    p.add_argument("--optimize", choices=("rtn", "gptq", "tune"), default=None,
                   help="gguf: how codes are chosen inside each type's blocks: rtn = llama.cpp's rounding (default), "
                        "gptq = error feedback through the calibration inputs' second moments (needs --calibration; "
                        "a plan may also record it per tensor), tune = gptq's codes and block scales refined "
                        "further against the same layer output error (needs --calibration)")
    p.add_argument("--calibration", default=None,
                   help="gguf: calibration folder from 'quantforge calibrate --hessians' or '--sequential TYPE' "
                        "(sequential.safetensors when present, else hessians.safetensors; its "
                        "imatrix.gguf is used when --imatrix is not given)")
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

            cal = _calibration_files(args)
            result = export_gguf(args.model, args.output, qtype=args.qtype or "f16", imatrix=cal["imatrix"],
                                 plan=args.plan, force=args.force, progress=progress, device=args.device,
                                 devices=devices, optimize=args.optimize or "rtn", hessians=cal["hessians"])
        else:
            result = group.on_main(lambda: _write_other(args))
    if group.is_main:
        out(f"wrote {result}")
    return 0


def _calibration_files(args: Any) -> dict[str, Any]:
    """The imatrix (``--imatrix``, else the calibration folder's when there is one) and the input second moments
    (the calibration folder's ``hessians.safetensors``, or None without ``--calibration``)."""
    from pathlib import Path

    if args.calibration is None:
        return {"imatrix": args.imatrix, "hessians": None}
    folder = Path(args.calibration)
    imatrix = args.imatrix
    if imatrix is None and (folder / "imatrix.gguf").is_file():
        imatrix = folder / "imatrix.gguf"
    return {"imatrix": imatrix, "hessians": _second_moments(folder) or folder / "hessians.safetensors"}


def _second_moments(folder: Any) -> Any:
    """The calibration folder's input statistics for ``--optimize``: ``sequential.safetensors`` (made for one
    type or plan by ``calibrate --sequential``) when there is one, else ``hessians.safetensors``, else None."""
    for name in ("sequential.safetensors", "hessians.safetensors"):
        if (folder / name).is_file():
            return folder / name
    return None


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
    _check_optimize(args)
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


def _check_optimize(args: Any) -> None:
    """``--optimize`` and ``--calibration`` are GGUF options; ``gptq`` needs a calibration folder holding the input
    second moments."""
    from pathlib import Path

    from quantforge.errors import InputError

    if args.format != "gguf":
        _checks.not_for(args.format, {"--optimize": args.optimize, "--calibration": args.calibration})
        return
    if args.calibration is not None and not Path(args.calibration).is_dir():
        raise InputError("the calibration folder was not found (make one with 'quantforge calibrate ... "
                         "--hessians')", path=args.calibration)
    if args.optimize in ("gptq", "tune"):
        if args.calibration is None:
            raise InputError(f"--optimize {args.optimize} needs --calibration DIR (from 'quantforge calibrate MODEL "
                             "--data F -o DIR --hessians')")
        if _second_moments(Path(args.calibration)) is None:
            raise InputError("has no hessians.safetensors; run 'quantforge calibrate MODEL --data F -o DIR "
                             "--hessians' (or '--sequential TYPE') into it", path=args.calibration)
