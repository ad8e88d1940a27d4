"""``quantforge train MODEL --data F -o ADAPTER_DIR``: QLoRA fine-tuning on the quantized base layout."""

from __future__ import annotations

import sys
from typing import Any

from ._common import out, progress

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune LoRA adapters on the quantized model (QLoRA)")
    p.add_argument("model", help="local HF checkpoint folder or Hub repo id")
    p.add_argument("--data", required=True,
                   help="JSONL / Parquet file or saved datasets folder: 'messages', 'instruction'+'output' or 'text'")
    p.add_argument("-o", "--output", required=True, help="adapter folder (PEFT format, with train_log.jsonl)")
    p.add_argument("--plan", default=None, help="bnb4 plan file: its skip_modules stay 16-bit")
    p.add_argument("--base-format", default="nf4",
                   help="base weight format without a plan: nf4 (default), fp4, bf16/f16/f32 or 16bit (compute dtype); "
                        "gguf with --plan: a gguf plan's per-tensor types, quantized in memory as 'quantforge "
                        "quantize --plan' writes them")
    p.add_argument("--base-gguf", default=None, metavar="FILE",
                   help="train on the weights of this GGUF file of MODEL (ours or llama.cpp's): its tensor types "
                        "are the layout")
    p.add_argument("--no-double-quant", action="store_true", help="nf4/fp4 without nested 8-bit absmax")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank) instead of alpha/rank")
    p.add_argument("--targets", nargs="+", default=list(_PROJECTIONS), metavar="PROJ",
                   help="projections with LoRA (default: all seven)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    p.add_argument("--warmup", type=float, default=0.0, help="warm-up steps (below 1: fraction of all steps)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per packed micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, default=None)
    steps.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=2048, help="longer examples are left out")
    p.add_argument("--eval-split", type=float, default=0.02, help="fraction of examples held out for the eval loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--optimizer", choices=("auto", "adamw", "paged_adamw_8bit"), default="auto",
                   help="auto: bitsandbytes paged 8-bit AdamW on CUDA when installed, else torch AdamW")
    p.add_argument("--save-steps", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--eval-steps", type=int, default=None, help="held-out loss every N steps (default: end only)")
    p.add_argument("--resume", default=None, help="checkpoint folder (or the output folder) to continue from")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.add_argument("--shard", action="store_true",
                   help="under torchrun: shard base weights, LoRA and optimizer states across ranks (FSDP2) instead "
                        "of a whole model per rank (data parallel)")
    p.set_defaults(func=run)


def _config(args: Any) -> Any:
    from quantforge.train.config import TrainConfig

    return TrainConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, rslora=args.rslora,
                       targets=tuple(args.targets), lr=args.lr, schedule=args.schedule, warmup=args.warmup,
                       batch_tokens=args.batch_tokens, grad_accum=args.grad_accum, max_steps=args.max_steps,
                       epochs=args.epochs or 1, max_seq_len=args.max_seq_len, eval_split=args.eval_split,
                       seed=args.seed, weight_decay=args.weight_decay,
                       max_grad_norm=args.max_grad_norm or None, optimizer=args.optimizer,
                       save_steps=args.save_steps, eval_steps=args.eval_steps)


class _Bar:
    """tqdm bar over optimizer steps showing loss, tokens/s and peak memory."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, rec: dict[str, Any]) -> None:
        if self.bar is None:
            self.bar = _tqdm(rec["total_steps"])
        if "loss" in rec:
            self.bar.update(rec["step"] - self.bar.n)
            post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{rec['tokens_per_s'] or 0:,.0f}"}
            if rec.get("peak_gib") is not None:
                post["peak"] = f"{rec['peak_gib']:.1f}GiB"
            self.bar.set_postfix(post, refresh=False)
        else:
            self.bar.write(f"step {rec['step']}: held-out loss {rec['eval_loss']:.4f}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tqdm(total: int) -> Any:
    import os

    from tqdm.auto import tqdm

    disable = not (sys.stderr.isatty() or os.environ.get("QUANTFORGE_PROGRESS") == "1")
    return tqdm(total=total, desc="train", unit="step", disable=disable, file=sys.stderr, dynamic_ncols=True)


def run(args: Any) -> int:
    """Under torchrun (``WORLD_SIZE`` > 1) every rank runs this on its own GPU (``--device cuda`` is each rank's
    own): data parallel, or FSDP2 with ``--shard``; rank 0 writes the adapter and reports."""
    import importlib.util

    import torch

    from quantforge.errors import MissingExtra

    if importlib.util.find_spec("datasets") is None:
        raise MissingExtra("quantforge train (reading --data)", "train", "datasets")

    from quantforge import distributed

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with distributed.launch(device) as group:
        return _run(args, group, device)


def _run(args: Any, group: Any, device: str) -> int:
    from quantforge.errors import InputError
    from quantforge.train import layer_sharder, load_model, load_tokenizer, train

    cfg = _config(args)
    if args.plan is not None and args.base_format not in ("nf4", "gguf", None):
        raise InputError("--plan sets the base layout; leave out --base-format (or pass gguf with a gguf plan)")
    if args.base_gguf is not None and args.base_format not in ("nf4", "gguf", None):
        raise InputError("--base-gguf sets the base layout; leave out --base-format")
    try:
        model = load_model(args.model, lora=cfg.lora_spec(), base_format=args.base_format, plan=args.plan,
                           double_quant=not args.no_double_quant, base_gguf=args.base_gguf,
                           device=group.local_device(device), seed=cfg.seed,
                           progress=progress if group.is_main else None,
                           on_layer=layer_sharder(cfg.gradient_checkpointing) if args.shard and group.distributed
                           else None)
        bar = _Bar()
        try:
            result = train(model, load_tokenizer(model.info["path"]), args.data, cfg, args.output,
                           resume=args.resume, force=args.force, on_step=bar, progress=progress, shard=args.shard)
        finally:
            bar.close()
    except _oom_types() as exc:
        raise InputError("out of GPU memory while loading the model; use a smaller --base-format (nf4) or a "
                         "plan that keeps fewer modules 16-bit") from exc
    if not group.is_main:
        return 0
    held = f"{result.eval_loss:.4f}" if result.eval_loss is not None else "n/a"
    first = f"{result.initial_eval_loss:.4f} -> " if result.initial_eval_loss is not None else ""
    out(f"wrote {result.output_dir} ({result.steps} steps, {result.data['train_examples']} training examples; "
        f"held-out loss {first}{held})")
    return 0


def _oom_types() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.cuda.OutOfMemoryError,)
