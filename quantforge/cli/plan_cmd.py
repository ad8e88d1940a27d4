"""``quantforge plan MODEL --calibration DIR --target gguf|bnb4 ... -o plan.yaml``: budgeted per-tensor choice."""

from __future__ import annotations

from typing import Any

from . import _checks
from ._common import out


def add_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="choose per-tensor formats from a calibration under a size budget")
    p.add_argument("model", help="local HF checkpoint folder or Hub repo id (the calibrated one)")
    p.add_argument("--calibration", required=True, help="folder written by 'quantforge calibrate'")
    p.add_argument("--target", choices=("gguf", "bnb4"), default="gguf",
                   help="gguf: per-tensor GGUF types under a size budget (default); bnb4: which modules stay 16-bit "
                        "in a bitsandbytes 4-bit checkpoint. The plan applies only to that --format")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--bpw", type=float, help="gguf: bits per weight over every tensor of the file")
    size.add_argument("--size-mb", type=float, help="gguf: tensor data size in MB (10^6 bytes)")
    size.add_argument("--like", help="gguf: the tensor data size of our file of this mix, e.g. q4_k_m")
    p.add_argument("--max-overhead", type=float, default=0.10,
                   help="bnb4: memory allowed above the uniform 4-bit checkpoint (default 0.10 = 10%%)")
    p.add_argument("--double-quant", action="store_true", help="bnb4: size the 4-bit modules with double quant")
    p.add_argument("--types", default=None, help="gguf: only these formats (comma-separated; f16 always allowed)")
    p.add_argument("--method", choices=("dp", "lagrange"), default="dp", help="knapsack solver (default dp)")
    p.add_argument("--optimize", choices=("rtn", "gptq", "tune"), default=None,
                   help="gguf: plan from the sensitivity measured under this rounding ('calibrate --optimize MODE') "
                        "and record the mode per tensor, so 'quantize --plan' rounds as the plan assumed")
    p.add_argument("-o", "--output", required=True, help="plan file (YAML)")
    p.add_argument("--force", action="store_true", help="overwrite an existing plan file")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    import os
    from pathlib import Path

    from quantforge.calibration import store
    from quantforge.errors import InputError, PlanError
    from quantforge.model_source import ModelSource
    from quantforge.plan import save_plan
    from quantforge.planner import load_sensitivity, plan_bnb4

    check_args(args)
    table = load_sensitivity(_sensitivity_file(args))
    src = ModelSource.open(args.model)
    if table["model"].get("hash") != store.model_hash(src):
        raise PlanError("the calibration was made for another model (hash mismatch); calibrate this model first",
                        path=args.calibration)
    folder = Path(args.calibration)
    plan_dir = Path(args.output).resolve().parent  # paths are recorded relative to the plan file: no local layout
    calib = {"folder": os.path.relpath(folder.resolve(), plan_dir), "model_hash": table["model"]["hash"]}
    if (folder / store.IMATRIX).is_file():  # recorded relative to the plan file, so the two can move together
        calib["imatrix"] = os.path.relpath((folder / store.IMATRIX).resolve(), plan_dir)
    if args.target == "bnb4":
        params = {n: t.shape for n, t in src.tensors.items()}
        plan = plan_bnb4(table, params, args.max_overhead, args.double_quant, args.method)
        plan.calibration = calib
        plan.model = _model_name(args.model, src)
        save_plan(plan, args.output, force=args.force)
        p = plan.predicted
        out(f"wrote {args.output}: {len(plan.skip_modules) - 1} modules stay 16-bit, overhead {p['overhead']:.2%} "
            f"over uniform nf4, predicted KLD sum {p['kld_sum']:.4g} (uniform {p['uniform_kld_sum']:.4g})")
        return 0
    if args.bpw is None and args.size_mb is None and args.like is None:
        raise InputError("give a size: --bpw, --size-mb or --like MIX")
    plan = _gguf_plan(args, src, table)
    if args.optimize is not None:
        for choice in plan.tensors.values():
            choice.optimize = args.optimize
    plan.calibration = calib
    plan.model = _model_name(args.model, src)
    plan.notes = f"apply with: quantforge quantize MODEL --format gguf --plan {Path(args.output).name} -o OUT.gguf"
    save_plan(plan, args.output, force=args.force)
    p = plan.predicted
    out(f"wrote {args.output}: {p['tensor_bytes']:,} tensor bytes ({p['bpw']:.4f} bpw, budget "
        f"{plan.budget['bytes']:,}), predicted KLD sum {p['kld_sum']:.4g}")
    cal_arg = f" --calibration {folder}" if args.optimize not in (None, "rtn") else ""
    out(f"apply with: quantforge quantize MODEL --plan {args.output}{cal_arg} -o OUT.gguf"
        + (f"  (with the calibration's imatrix, {folder / store.IMATRIX})" if "imatrix" in calib else ""))
    return 0


def _gguf_plan(args: Any, src: Any, table: dict[str, Any]) -> Any:
    import math

    from quantforge.arch import arch_for
    from quantforge.formats import get_format
    from quantforge.planner import plan_gguf
    from quantforge.presets import MIXES, get_mix, mix_types
    from quantforge.tensor_layout import model_shape, plan_tensors

    jobs = plan_tensors(src, arch_for(src.model_type))
    tensors = [(j.gguf_name, tuple(j.shape)) for j in jobs]
    n_el = sum(math.prod(s) for _, s in tensors)
    note: dict[str, Any] = {}
    if args.like:
        mix = get_mix(args.like)
        types = mix_types(mix.name, tensors, model_shape(src, jobs), has_imatrix=True)
        budget = sum(get_format(types[n]).nbytes(s) for n, s in tensors)
        base = mix.name
        note["like"] = mix.name
    elif args.bpw is not None:
        budget = int(args.bpw * n_el / 8)
        note["bpw"] = args.bpw
        base = None
    else:
        budget = int(args.size_mb * 1e6)
        note["size_mb"] = args.size_mb
        base = None
    if base is None:
        bpw = 8.0 * budget / n_el
        k_mixes = [m for m in MIXES.values() if m.base not in ("f32", "f16", "bf16")]
        base = min(k_mixes, key=lambda m: abs(get_format(m.base).bits_per_weight - bpw)).name
    allowed = {t.strip().lower() for t in args.types.split(",")} if args.types else None
    from pathlib import Path

    from quantforge.calibration import store

    has_imatrix = (Path(args.calibration) / store.IMATRIX).is_file()
    return plan_gguf(table, tensors, budget, base_type=base, method=args.method, allowed=allowed, budget_note=note,
                     has_imatrix=has_imatrix)


def check_args(args: Any) -> None:
    """Sizes, types, the calibration folder, the output file and the model's config, before any work."""
    from pathlib import Path

    from quantforge.errors import InputError, MissingFile
    from quantforge.formats import get_format
    from quantforge.presets import get_mix

    for flag, value in (("--bpw", args.bpw), ("--size-mb", args.size_mb)):
        if value is not None and not value > 0:
            raise InputError(f"{flag} must be > 0; got {value}")
    if args.max_overhead < 0:
        raise InputError(f"--max-overhead must be >= 0; got {args.max_overhead}")
    if args.like:
        get_mix(args.like)
    for name in (args.types or "").split(","):
        if name.strip():
            get_format(name.strip().lower())
    folder = Path(args.calibration)
    if not folder.is_dir():
        raise MissingFile("no such calibration folder (written by 'quantforge calibrate')", path=folder)
    _checks.output_file(args.output, args.force, example="plan.yaml")
    _checks.model(args.model, gguf=args.target == "gguf")


def _sensitivity_file(args: Any) -> Any:
    """The calibration's table measured under ``--optimize`` (the default rounding's without it)."""
    from pathlib import Path

    from quantforge.calibration import store
    from quantforge.errors import MissingFile

    name = store.sensitivity_files(args.optimize or "rtn")[0]
    path = Path(args.calibration) / name
    if args.optimize not in (None, "rtn") and not path.is_file():
        raise MissingFile(f"no {name}; run 'quantforge calibrate MODEL --data F -o DIR --optimize {args.optimize}' "
                          "first", path=args.calibration)
    return path


def _model_name(model_arg: str, src: Any) -> str:
    """What the plan records as its model: the Hub repo id, or the checkpoint folder's name (the calibration's
    ``model_hash`` identifies the weights; a local absolute path would only leak the machine's layout)."""
    from pathlib import Path

    return model_arg if not Path(model_arg).exists() else Path(src.path).resolve().name
