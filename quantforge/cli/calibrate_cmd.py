"""``quantforge calibrate MODEL --data F [--data F2] -o DIR``: importance matrix and per-tensor sensitivity."""

from __future__ import annotations

from typing import Any

from . import _checks
from ._common import out, progress


def add_parser(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="importance matrix + per-tensor KLD sensitivity of a model")
    p.add_argument("model", help="local HF checkpoint folder or Hub repo id")
    p.add_argument("--data", action="append", required=True,
                   help="calibration text: plain text, JSONL with a text field, or chat/instruction JSONL "
                        "(rendered with the model's chat template); repeat for several files")
    p.add_argument("-o", "--output", required=True, help="calibration folder (results are cached there)")
    p.add_argument("--tokens", type=int, default=8192,
                   help="calibration tokens for the imatrix and XᵀX (default 8192; for 'quantize --optimize "
                        "gptq|tune' use 65536 or more: error feedback fits the inputs' correlations, which few tokens "
                        "estimate poorly)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--holdout-tokens", type=int, default=512,
                   help="held-out tokens for the sensitivity measurements (default 512)")
    p.add_argument("--candidates", default=None,
                   help="formats to profile, comma-separated (default q2_k,q3_k,iq4_xs,q4_k,q5_k,q6_k,q8_0,nf4); "
                        "rows that a K type does not fit get its fallback and the legacy/IQ4 types; f16 is the top")
    p.add_argument("--measure", choices=("all", "sample", "none"), default="sample",
                   help="KLD measured for every (tensor, format) pair, a sample (the rest predicted by the "
                        "fitted proxy), or none (Fisher prediction only)")
    p.add_argument("--sample-layers", type=int, default=4, help="layers measured per tensor kind in sample mode")
    p.add_argument("--fisher-draws", type=int, default=4, help="label draws per held-out chunk for the Fisher")
    p.add_argument("--proxy-rows", type=int, default=256, help="rows per tensor used for the proxies (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="chunks per forward in the imatrix pass")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder that is not a calibration")
    p.add_argument("--hessians", action="store_true",
                   help="also save the inputs' second moments XᵀX per linear input (hessians.safetensors, one "
                        "n x n float32 matrix per input group) for 'quantize --optimize gptq' and 'tune'")
    p.add_argument("--sequential", default=None, metavar="TYPE|PLAN",
                   help="also save the statistics of the quantized model's own inputs for the GGUF mix TYPE (or "
                        "plan file PLAN) and the --optimize mode (gptq when rtn): each linear is rounded, layer "
                        "after layer, to make its output on those inputs match the float model's "
                        "(sequential.safetensors, which 'quantize --optimize' then prefers; slower than --hessians)")
    p.add_argument("--optimize", choices=("rtn", "gptq", "tune"), default="rtn",
                   help="rounding the sensitivity measurements quantize each candidate with, as 'quantize --optimize' "
                        "will (default rtn); another mode also saves hessians.safetensors and writes its own table "
                        "(sensitivity-MODE.json, for 'plan --optimize MODE'), cached beside the others")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    """Under torchrun (``WORLD_SIZE`` > 1) every rank runs this: calibration batches and per-tensor sensitivity
    work are split across ranks (``--device cuda`` is each rank's own GPU); rank 0 writes the folder."""
    import contextlib
    from pathlib import Path

    from quantforge import distributed

    check_args(args)
    folder = Path(args.output)
    existed = folder.exists()
    try:
        with distributed.launch(args.device) as group:
            return _run(args, group)
    except BaseException:
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            with contextlib.suppress(OSError):  # another rank may have removed it first
                folder.rmdir()  # an error or interrupt leaves no empty output folder behind
        raise


def check_args(args: Any) -> None:
    """Numbers, data files, the output folder, the candidate list and the model's config, before any work."""
    from pathlib import Path

    from quantforge.calibration.candidates import parse_candidates
    from quantforge.errors import InputError

    for flag, value in (("--tokens", args.tokens), ("--ctx", args.ctx), ("--holdout-tokens", args.holdout_tokens),
                        ("--sample-layers", args.sample_layers), ("--fisher-draws", args.fisher_draws),
                        ("--batch-size", args.batch_size)):
        _checks.positive(flag, value)
    _checks.positive("--proxy-rows", args.proxy_rows, allow_zero=True)
    for data in args.data:
        _checks.input_file(data, "a calibration text file (plain text or JSONL)")
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("is a file; the calibration output is a folder", path=out_dir)
    parse_candidates(args.candidates)
    if args.sequential and not Path(args.sequential).is_file():
        from quantforge.presets import get_mix

        get_mix(args.sequential)
    _checks.model(args.model)
    import importlib.util

    from quantforge.errors import MissingExtra

    if importlib.util.find_spec("matplotlib") is None:
        raise MissingExtra("calibrate's sensitivity.png", "plot", "matplotlib")


def _run(args: Any, group: Any) -> int:
    from pathlib import Path

    from quantforge.calibration import store
    from quantforge.calibration.candidates import parse_candidates
    from quantforge.calibration.pipeline import CalibrationSettings, calibrate

    settings = CalibrationSettings(tokens=args.tokens, ctx=args.ctx, holdout_tokens=args.holdout_tokens,
                                   candidates=parse_candidates(args.candidates), measure=args.measure,
                                   sample_layers=args.sample_layers, fisher_draws=args.fisher_draws,
                                   proxy_rows=args.proxy_rows, seed=args.seed, rounding=args.optimize)
    result = calibrate(args.model, args.data, args.output, settings, device=args.device, batch_size=args.batch_size,
                       progress=progress if group.is_main else _quiet, force=args.force)
    if args.hessians:
        from quantforge.calibration.hessian_pass import calibrate_hessians

        hess = group.on_main(lambda: calibrate_hessians(args.model, args.data, args.output, settings,
                                                        device=args.device, batch_size=args.batch_size,
                                                        progress=progress))
        if group.is_main:
            out(f"{'reused' if hess['reused'] else 'wrote'} {hess['path']}")
    if args.sequential:
        from quantforge.calibration.sequential import calibrate_sequential

        target = {"plan": args.sequential} if Path(args.sequential).is_file() else {"qtype": args.sequential}
        seq = group.on_main(lambda: calibrate_sequential(
            args.model, args.data, args.output, settings, **target,
            mode=args.optimize if args.optimize != "rtn" else "gptq", device=args.device,
            batch_size=args.batch_size, progress=progress))
        if group.is_main:
            out(f"{'reused' if seq['reused'] else 'wrote'} {seq['path']}")
    if not group.is_main:
        return 0
    if result.sensitivity_reused:
        out(f"reused {result.folder} (same model, data and settings)")
    else:
        done = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
        note = " (imatrix reused)" if result.imatrix_reused else ""
        table, plot = store.sensitivity_files(settings.rounding)[:2]
        out(f"wrote {result.folder}: imatrix.gguf, {table}, {plot}{note} [{done}]")
    return 0


def _quiet(items: Any, **_: Any) -> Any:
    return items
