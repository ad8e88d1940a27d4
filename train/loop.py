"""The training loop: packed micro-batches, gradient accumulation, AdamW, checkpoints, held-out loss.

The loss of an optimizer step is the mean over every target token of its micro-batches (each micro-batch's
summed loss is divided by the step's total target count before ``backward``), so how examples are packed or split
into micro-batches does not change the gradient. Under ``torchrun`` (:mod:`.distributed`) every rank runs this loop
on the same global schedule, takes its share of each step's examples and divides by the step's global target
count; the gradients are summed over ranks (all-reduced, or reduce-scattered when sharded), so a run's result does
not depend on the number of ranks. Only rank 0 writes files and calls ``on_step``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist_core
from ..errors import InputError, OutputExists
from ..io import atomic_file
from .adapter import lora_state, save_adapter
from .checkpoint import CHECKPOINTS, load_checkpoint, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import Example, build_examples
from .distributed import Parallel, place_optimizer_state, reseed, setup
from .model import CausalLM
from .optim import make_optimizer, make_scheduler, optimizer_name
from .packing import Schedule, dummy_batch, make_batch, pack_indices, rank_batches

LOG_FILE = "train_log.jsonl"


@dataclass
class TrainResult:
    """Where the adapter went and how the run ended (``eval_loss``: held-out loss at the end)."""

    output_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    initial_eval_loss: float | None
    log: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def split_examples(examples: list[Example], eval_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded hold-out: ``eval_split`` of the examples (at least one when the split is non-zero and there are
    two or more) are kept for the held-out loss; the rest keep their order for training."""
    n_eval = int(round(len(examples) * eval_split))
    if eval_split > 0 and len(examples) >= 2:
        n_eval = max(1, n_eval)
    n_eval = min(n_eval, len(examples) - 1)
    held = set(random.Random(seed).sample(range(len(examples)), n_eval)) if n_eval > 0 else set()
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


@torch.no_grad()
def evaluate(model: CausalLM, examples: list[Example], batch_tokens: int,
             parallel: Parallel | None = None) -> float | None:
    """Mean token loss over ``examples`` (packed, in order), or ``None`` without examples. Under several ranks
    (a collective) each rank evaluates a token-balanced share of the packed batches."""
    if not examples:
        return None
    par = parallel or Parallel()
    was = model.training
    model.eval()
    groups = pack_indices([len(e) for e in examples], list(range(len(examples))), batch_tokens)
    owners = dist_core.partition([sum(len(examples[i]) for i in g) for g in groups], par.world)
    mine = [g for g, o in zip(groups, owners, strict=True) if o == par.rank]
    rounds = max(owners.count(r) for r in range(par.world)) if par.sharded else len(mine)
    total, count = 0.0, 0
    for k in range(rounds):
        batch = make_batch([examples[i] for i in mine[k]]) if k < len(mine) else dummy_batch()
        if batch.n_targets == 0 and not par.sharded:
            continue
        ids, labels, pos, pack = batch.to(model.device)
        loss = float(par.loss(model, ids, pos, labels, pack))
        if k < len(mine):
            total += loss
            count += batch.n_targets
    if par.root is not None:
        par.root.reshard()
    total, count = par.sum([total, float(count)])
    model.train(was)
    return total / count if count else None


def _write_log(folder: Path, log: list[dict[str, Any]]) -> None:
    with atomic_file(folder / LOG_FILE, force=True) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in log), encoding="utf-8")


def _prepare_output(out: Path, force: bool, resuming: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExists("the adapter output must be a folder, and a file of that name exists", path=out)
    if out.exists() and not resuming:
        if not force:
            raise OutputExists("output folder already exists; pass --force to overwrite it or --resume to continue",
                               path=out)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _peak_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def _oom(step: int, batch_tokens: int, cfg: TrainConfig) -> InputError:
    return InputError(f"out of GPU memory at step {step} (micro-batch of up to {batch_tokens} tokens, rank "
                      f"{cfg.rank}); lower --batch-tokens (raise --grad-accum to keep the batch size) or "
                      "--max-seq-len")


class Trainer:
    """One run's state: model, data schedule, optimizer, scheduler, log."""

    def __init__(self, model: CausalLM, train_ex: list[Example], eval_ex: list[Example], cfg: TrainConfig,
                 parallel: Parallel | None = None):
        self.model, self.train_ex, self.eval_ex, self.cfg = model, train_ex, eval_ex, cfg
        self.par = parallel or Parallel()
        self.lengths = [len(e) for e in train_ex]
        self.targets = [e.n_targets for e in train_ex]
        self.schedule = Schedule(self.lengths, cfg.batch_tokens, cfg.seed)
        if cfg.max_steps is not None:
            self.total_steps = cfg.max_steps
            self.total_micro = cfg.max_steps * cfg.grad_accum
        else:
            self.total_micro = self.schedule.micro_batches_in(cfg.epochs)
            self.total_steps = math.ceil(self.total_micro / cfg.grad_accum)
        params = [p for m in model.lora_modules().values() for p in (m.lora_A, m.lora_B)]
        self.optimizer_name = optimizer_name(self.par.optimizer_config(cfg), model.device)
        self.opt = make_optimizer(params, self.par.optimizer_config(cfg), model.device)
        self.sched = make_scheduler(self.opt, cfg, self.total_steps)
        self.params = params
        self.log: list[dict[str, Any]] = []

    def step(self, step: int) -> dict[str, Any]:
        """One optimizer step; returns its log record (the same on every rank but for ``seconds``)."""
        cfg, model, par = self.cfg, self.model, self.par
        t0 = time.perf_counter()
        micro = range(step * cfg.grad_accum, min((step + 1) * cfg.grad_accum, self.total_micro))
        picks = [self.schedule.micro_batch(g) for g in micro]
        n_targets = sum(self.targets[i] for _, idx in picks for i in idx)
        tokens = sum(self.lengths[i] for _, idx in picks for i in idx)
        shares = rank_batches(picks, self.lengths, cfg.batch_tokens, par.world)
        mine = [make_batch([self.train_ex[i] for i in idx]) for idx in shares[par.rank]]
        if par.sharded:  # every rank makes the same number of passes through the sharded layers
            mine += [dummy_batch()] * (max(len(s) for s in shares) - len(mine))
        loss_sum = 0.0
        for b in mine:
            if b.n_targets == 0 and not par.sharded:
                continue
            ids, labels, pos, pack = b.to(model.device)
            loss = par.loss(model, ids, pos, labels, pack)
            (loss / max(n_targets, 1)).backward()
            loss_sum += float(loss.detach())
        par.reduce_gradients(self.params)
        if par.world > 1:
            loss_sum = par.sum([loss_sum])[0]
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = par.grad_norm(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        dt = time.perf_counter() - t0
        return {"step": step + 1, "epoch": picks[-1][0] if picks else 0, "loss": loss_sum / max(n_targets, 1),
                "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "targets": n_targets, "seconds": dt,
                "tokens_per_s": tokens / dt if dt > 0 else None, "peak_gib": par.max(_peak_gib(model.device)),
                "total_steps": self.total_steps}


def train(model: CausalLM, tokenizer: Any, data: Any, config: TrainConfig | None = None,
          output_dir: str | os.PathLike[str] = "adapter", *, resume: str | os.PathLike[str] | None = None,
          force: bool = False, on_step: Callable[[dict[str, Any]], None] | None = None,
          progress: Any = None, shard: bool = False) -> TrainResult:
    """Train ``model``'s LoRA on ``data`` (a JSONL/Parquet path, a saved dataset folder or a ``datasets.Dataset``)
    and save the adapter in PEFT format to ``output_dir``, with ``train_log.jsonl`` and checkpoints inside.

    ``resume``: a checkpoint folder (or an output folder holding ``checkpoints/``) to continue from; its settings
    must equal ``config``'s. ``on_step(record)`` is called after every optimizer step and evaluation (a progress
    bar hooks in here); ``progress`` wraps the tokenization loop.

    Under ``torchrun`` every rank calls this with its own model (joining the job if no process group exists yet;
    on CUDA call :func:`~.distributed.init_distributed` before loading so each rank's model is on its own GPU):
    data parallel by default, FSDP2 with ``shard=True`` (:mod:`.fsdp`; the model then runs only through the
    sharded root). ``on_step`` and ``progress`` are used on rank 0 only, which alone writes ``output_dir``.
    """
    cfg = config or TrainConfig()
    if model.info["lora"] != cfg.lora_spec():
        raise InputError(f"the model carries LoRA {model.info['lora']}, the config asks for {cfg.lora_spec()}; "
                         "load the model with lora=config.lora_spec()")
    with dist_core.launch(model.device.type) as group:
        par = setup(model, cfg, shard, group)
        main = group.is_main
        return _run(model, tokenizer, data, cfg, Path(output_dir), par, resume, force,
                    on_step if main else None, progress if main else None)


def _run(model: CausalLM, tokenizer: Any, data: Any, cfg: TrainConfig, out: Path, par: Parallel,
         resume: str | os.PathLike[str] | None, force: bool, on_step: Callable[[dict[str, Any]], None] | None,
         progress: Any) -> TrainResult:
    group = par.group
    group.on_main(lambda: _prepare_output(out, force, resume is not None))
    examples, stats = build_examples(data, tokenizer, cfg.max_seq_len, progress)
    train_ex, eval_ex = split_examples(examples, cfg.eval_split, cfg.seed)
    tr = Trainer(model, train_ex, eval_ex, cfg, par)
    stats.update({"train_examples": len(train_ex), "eval_examples": len(eval_ex), "optimizer": tr.optimizer_name})
    start = 0
    if resume is not None:
        r = load_checkpoint(resume, model, par)
        diff = cfg.differences(r.config)
        if diff:
            raise InputError(f"the checkpoint was made with other settings ({', '.join(diff)}); resume with the "
                             "same settings")
        if r.optimizer_name not in (None, tr.optimizer_name):
            raise InputError(f"the checkpoint holds {r.optimizer_name} states and this run uses "
                             f"{tr.optimizer_name}; resume with --optimizer {r.optimizer_name}"
                             + (" and without --shard (sharded runs use adamw)" if par.sharded else ""))
        tr.opt.load_state_dict(place_optimizer_state(r.optimizer, tr.params))
        tr.sched.load_state_dict(r.scheduler)
        if r.rng is not None:
            set_rng_state(r.rng, model.device)
        else:
            reseed(cfg.seed, r.step, par.rank)
        start, tr.log = r.step, r.log
    else:
        torch.manual_seed(cfg.seed + par.rank)
    if not par.sharded:
        model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()

    def record(rec: dict[str, Any]) -> None:
        tr.log.append(rec)
        if on_step is not None:
            on_step(rec)

    initial = None
    if start == 0 and eval_ex:
        initial = evaluate(model, eval_ex, cfg.batch_tokens, par)
        record({"step": 0, "eval_loss": initial, "total_steps": tr.total_steps})
    elif eval_ex:
        initial = next((r["eval_loss"] for r in tr.log if r.get("step") == 0 and "eval_loss" in r), None)
    for step in range(start, tr.total_steps):
        try:
            rec = tr.step(step)
        except torch.cuda.OutOfMemoryError as exc:
            raise _oom(step + 1, cfg.batch_tokens, cfg) from exc
        record(rec)
        done = step + 1
        if cfg.eval_steps and done % cfg.eval_steps == 0 and done < tr.total_steps and eval_ex:
            record({"step": done, "eval_loss": evaluate(model, eval_ex, cfg.batch_tokens, par),
                    "total_steps": tr.total_steps})
        if done % cfg.save_steps == 0 and done < tr.total_steps:
            save_checkpoint(out, model, tr.opt, tr.sched, done, cfg, tr.log, cfg.keep_checkpoints, par,
                            tr.optimizer_name)
            group.on_main(lambda: _write_log(out, tr.log))
    final = evaluate(model, eval_ex, cfg.batch_tokens, par)
    if final is not None:
        record({"step": tr.total_steps, "eval_loss": final, "total_steps": tr.total_steps})
    train_losses = [r["loss"] for r in tr.log if "loss" in r]
    summary = {"train_config": cfg.to_dict(), "steps": tr.total_steps, "eval_loss": final,
               "initial_eval_loss": initial, "data": stats, "parallel": par.describe()}
    state = lora_state(model) if par.sharded or group.is_main else None

    def write() -> None:
        save_adapter(model, out, summary, state)
        _write_log(out, tr.log)

    group.on_main(write)
    return TrainResult(out, tr.total_steps, train_losses[-1] if train_losses else None, final, initial, tr.log, stats)
