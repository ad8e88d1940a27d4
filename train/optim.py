"""Optimizer and learning-rate schedule.

AdamW over the LoRA parameters: bitsandbytes' paged 8-bit AdamW on CUDA when bitsandbytes is installed
(``optimizer="auto"``), else ``torch.optim.AdamW``. The schedule is a linear warm-up followed by cosine, linear or
constant decay, the same multipliers as transformers' ``get_*_schedule_with_warmup``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable

import torch

from ..errors import InputError
from .config import TrainConfig


def optimizer_name(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.optimizer != "auto":
        return cfg.optimizer
    if device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None:
        return "paged_adamw_8bit"
    return "adamw"


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    name = optimizer_name(cfg, device)
    params = list(params)
    if name == "paged_adamw_8bit":
        if device.type != "cuda":
            raise InputError("paged_adamw_8bit runs on CUDA only; use optimizer 'adamw' on the CPU")
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise InputError("optimizer paged_adamw_8bit needs bitsandbytes (pip install bitsandbytes)") from exc
        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                        weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return int(math.ceil(cfg.warmup * total)) if 0 < cfg.warmup < 1 else int(cfg.warmup)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = warmup_steps(cfg, total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warm, cfg.schedule))
