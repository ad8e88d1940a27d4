"""Training checkpoints: everything a resumed run needs to continue exactly where this one stood.

A checkpoint folder ``checkpoints/step-NNNNNNN`` holds the LoRA weights (``adapter_model.safetensors``), the
optimizer and scheduler states and the RNG states (``state.pt``), and ``trainer.json`` (step, settings, the log so
far). It is written under a temporary name and renamed when complete, so an interrupted run keeps its last
complete checkpoint; older ones beyond ``keep`` are deleted after the new one is in place.

Under several ranks saving and loading are collectives (every rank calls them): the LoRA weights and optimizer
states are gathered whole (FSDP shards included), rank 0 writes them with every rank's RNG state, and on resume
rank 0 reads the files and hands them to the others. Nothing in a checkpoint depends on the number of ranks that
wrote it, so ``--resume`` works on any number; only the RNG (LoRA dropout) is re-seeded when that number
changes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptCheckpoint, InputError, MissingFile
from ..io import atomic_dir
from .adapter import ADAPTER_WEIGHTS, load_lora_state, lora_state
from .config import TrainConfig
from .distributed import Parallel, full_optimizer_state
from .model import CausalLM

CHECKPOINTS = "checkpoints"
_STATE = "state.pt"
_TRAINER = "trainer.json"


@dataclass
class Resumed:
    """What a checkpoint restores besides the weights it loads in place."""

    step: int
    config: TrainConfig
    log: list[dict[str, Any]]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any] | None
    optimizer_name: str | None = None
    world: int = 1


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(folder: Path, model: CausalLM, opt: torch.optim.Optimizer, sched: Any, step: int,
                    cfg: TrainConfig, log: list[dict[str, Any]], keep: int, parallel: Parallel | None = None,
                    optimizer_name: str | None = None) -> Path:
    """Write ``folder/checkpoints/step-<step>`` atomically and prune the oldest beyond ``keep`` (rank 0 writes;
    under several ranks every rank calls this)."""
    par = parallel or Parallel()
    gather = par.sharded or par.group.is_main
    weights = lora_state(model) if gather else None
    optim = (full_optimizer_state(opt) if par.sharded else opt.state_dict()) if gather else None
    rngs = par.group.all_gather_object(rng_state(model.device))

    def write() -> Path:
        from safetensors.torch import save_file

        root = folder / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        dest = root / f"step-{step:07d}"
        with atomic_dir(dest, force=True) as tmp:
            save_file(weights, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            torch.save({"optimizer": optim, "scheduler": sched.state_dict(), "rng": rngs[0], "rng_ranks": rngs},
                       tmp / _STATE)
            meta = {"step": step, "config": cfg.to_dict(), "log": log, "model": model.info["model"],
                    "layout": model.info["layout"], "world": par.world, "optimizer": optimizer_name}
            (tmp / _TRAINER).write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return dest

    return par.group.on_main(write)


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when it is a checkpoint, else the newest checkpoint under ``path/checkpoints``."""
    p = Path(path)
    if (p / _TRAINER).is_file():
        return p
    found = sorted(q for q in (p / CHECKPOINTS).glob("step-*") if (q / _TRAINER).is_file())
    if not found:
        raise MissingFile("no training checkpoint here (expected trainer.json, or checkpoints/step-* inside)", path=p)
    return found[-1]


def _layout_key(layout: Any) -> Any:
    """The layout without where its plan file lies (a moved plan is the same base)."""
    return {k: v for k, v in layout.items() if k != "plan_file"} if isinstance(layout, dict) else layout


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], dict[str, Any],
                                                      dict[str, torch.Tensor]]:
    """The files of checkpoint ``path``: its folder, ``trainer.json``, ``state.pt`` and the LoRA weights."""
    from safetensors.torch import load_file

    ckpt = find_checkpoint(path)
    try:
        meta = json.loads((ckpt / _TRAINER).read_text(encoding="utf-8"))
        state = torch.load(ckpt / _STATE, map_location="cpu", weights_only=False)
        weights = load_file(str(ckpt / ADAPTER_WEIGHTS))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpoint(f"unreadable training checkpoint ({type(exc).__name__}: {exc})", path=ckpt) from exc
    return ckpt, meta, state, weights


def load_checkpoint(path: str | os.PathLike[str], model: CausalLM, parallel: Parallel | None = None) -> Resumed:
    """Load the LoRA weights of checkpoint ``path`` into ``model`` and return the rest of its state (rank 0
    reads the files; under several ranks every rank calls this). ``rng`` is this rank's saved RNG state, or
    ``None`` when the checkpoint was written by another number of ranks."""
    par = parallel or Parallel()
    ckpt, meta, state, weights = par.group.on_main(lambda: read_checkpoint(path))
    if _layout_key(meta.get("layout")) != _layout_key(json.loads(json.dumps(model.info["layout"]))):
        raise InputError("the checkpoint was trained on another base layout (format or plan) than this model",
                         path=ckpt)
    load_lora_state(model, weights, where=ckpt)
    world = int(meta.get("world", 1))
    rngs = state.get("rng_ranks", [state["rng"]])
    rng = rngs[par.rank] if world == par.world and len(rngs) == par.world else None
    return Resumed(int(meta["step"]), TrainConfig.from_dict(meta["config"]), list(meta["log"]), state["optimizer"],
                   state["scheduler"], rng, meta.get("optimizer"), world)
