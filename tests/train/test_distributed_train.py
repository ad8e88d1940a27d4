"""Training on two ranks (CPU, gloo, started the way torchrun starts them) gives the adapter of one process with
the same global batch: data parallel through ``quantforge train``, FSDP2 with ``--shard`` (NF4 base weights
sharded by rows) and through the Python API; checkpoints resume on another number of ranks. Plus the pure
helpers: how a step's examples are split among ranks.

One module fixture runs everything once: the one-process reference (checkpoint at step 3) in this process, then
two worker processes (``WORKER``) in one process group, then one-process resumes of the two-rank checkpoints.
"""

from __future__ import annotations

import json

import pytest
import torch
from quantforge.train import TrainConfig
from quantforge.train.distributed import Parallel
from quantforge.train.packing import Schedule, rank_batches
from helpers.spawn import run_ranks

from quantforge.distributed import Group
from quantforge.errors import InputError

CONFIG = dict(rank=4, alpha=8.0, lr=1e-2, max_steps=5, batch_tokens=128, max_seq_len=64, grad_accum=2,
              save_steps=3, eval_split=0.1, warmup=2, optimizer="adamw")
CLI_ARGS = ["--rank", "4", "--alpha", "8", "--lr", "1e-2", "--max-steps", "5", "--batch-tokens", "128",
            "--max-seq-len", "64", "--grad-accum", "2", "--save-steps", "3", "--eval-split", "0.1", "--warmup", "2",
            "--optimizer", "adamw"]
#: Largest |difference| of a LoRA weight between a one-process and a two-rank run (float32, 5 AdamW steps;
#: measured: 4e-7 data parallel, 8e-8 sharded, from float additions in another order).
TOL = 2e-6

WORKER = r"""
import json, sys
import torch.distributed as dist
from quantforge.cli.main import main
from quantforge.train import TrainConfig, init_distributed, load_model, load_tokenizer, train

cfg = json.loads(sys.argv[1])
group = init_distributed("cpu")
common = ["--data", cfg["data"], "--device", "cpu", *cfg["args"]]
codes = {"world": group.world, "backend": group.backend}
codes["ddp"] = main(["train", cfg["model"], "-o", cfg["out"] + "/ddp", *common])
codes["fsdp"] = main(["train", cfg["model"], "-o", cfg["out"] + "/fsdp", "--shard", *common])
tc = TrainConfig(**cfg["config"])
model = load_model(cfg["model"], lora=tc.lora_spec(), base_format="nf4", device="cpu")
res = train(model, load_tokenizer(cfg["model"]), cfg["data"], tc, cfg["out"] + "/fsdp-from-one", resume=cfg["ref"],
            shard=True)
codes["resumed_eval_loss"] = res.eval_loss
q = model.layers[0].self_attn.q_proj
codes["base"] = [type(q.base_data).__name__, str(q.base_data.dtype), list(q.base_data.to_local().shape),
                 list(q.base_data.shape)]
json.dump(codes, open(cfg["out"] + f"/rank{group.rank}.json", "w"))
dist.destroy_process_group()
"""


def _records(n):
    return [{"instruction": f"Write the number {i} in words, then add {i % 7}.",
             "output": f"The number {i}, and {i % 7} more, makes {i + i % 7}."} for i in range(n)]


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tiny_chat_model, tmp_path_factory):
    from quantforge.train import TrainConfig, load_model, load_tokenizer, train

    root = tmp_path_factory.mktemp("dtrain")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(24)))
    cfg = TrainConfig(**CONFIG)
    tok = load_tokenizer(tiny_chat_model)

    def one(out, resume=None):
        model = load_model(tiny_chat_model, lora=cfg.lora_spec(), base_format="nf4", device="cpu")
        return train(model, tok, data, cfg, root / out, resume=resume)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the workers (OMP_NUM_THREADS=1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch references, here and in the workers
            results = {"one": one("one")}
            job = {"model": str(tiny_chat_model), "data": str(data), "out": str(root), "args": CLI_ARGS,
                   "config": CONFIG, "ref": str(root / "one" / "checkpoints" / "step-0000003")}
            logs = run_ranks(WORKER, job, root)
            for name in ("ddp", "fsdp"):
                results[f"{name}-on-one"] = one(f"{name}-on-one", resume=root / name / "checkpoints" / "step-0000003")
    finally:
        torch.set_num_threads(threads)
    codes = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    return root, results, codes, logs


def test_two_ranks_train_the_one_process_adapter(runs):
    """DDP (plain ``quantforge train`` under two ranks) and FSDP2 (``--shard``) give the one-process adapter."""
    root, results, codes, logs = runs
    assert [c["world"] for c in codes] == [2, 2] and codes[0]["backend"] == "gloo"
    assert [(c["ddp"], c["fsdp"]) for c in codes] == [(0, 0), (0, 0)]
    ref = _adapter(root / "one")
    assert max(t.abs().max().item() for k, t in ref.items() if "lora_B" in k) > 1e-2  # the run moved the adapter
    for name in ("ddp", "fsdp"):
        assert _max_diff(_adapter(root / name), ref) < TOL, name
        info = json.loads((root / name / "quantforge_adapter.json").read_text())
        assert info["parallel"] == {"mode": name, "world": 2}
        assert abs(info["eval_loss"] - results["one"].eval_loss) < 1e-5
        log = [json.loads(x) for x in (root / name / "train_log.jsonl").read_text().splitlines()]
        ref_log = [r for r in results["one"].log if "loss" in r]
        got = [r for r in log if "loss" in r]
        assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
        assert [(r["tokens"], r["targets"]) for r in got] == [(r["tokens"], r["targets"]) for r in ref_log]
        assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(got, ref_log, strict=True))
    assert "wrote" in logs[0][1] and "wrote" not in logs[1][1]  # only rank 0 reports and writes
    # sharded: each rank holds half the rows of the packed NF4 bytes (64 outputs x 33-byte blocks of 64 inputs)
    assert [c["base"] for c in codes] == [["DTensor", "torch.uint8", [32, 33], [64, 33]]] * 2


def test_two_rank_checkpoints_resume_on_one_process(runs):
    """A step-3 checkpoint of either two-rank run, resumed by one process, reaches the one-process adapter at step
    5; a one-process checkpoint resumed on two sharded ranks does too."""
    root, results, codes, _ = runs
    ref = _adapter(root / "one")
    for name in ("ddp", "fsdp"):
        ckpt = root / name / "checkpoints" / "step-0000003"
        meta = json.loads((ckpt / "trainer.json").read_text())
        assert meta["world"] == 2 and meta["step"] == 3
        assert _max_diff(_adapter(root / f"{name}-on-one"), ref) < TOL, name
        resumed = results[f"{name}-on-one"]
        assert [r["step"] for r in resumed.log if "loss" in r] == [1, 2, 3, 4, 5]
        assert abs(resumed.eval_loss - results["one"].eval_loss) < 1e-5
    assert _max_diff(_adapter(root / "fsdp-from-one"), ref) < TOL
    assert abs(codes[0]["resumed_eval_loss"] - results["one"].eval_loss) < 1e-5


def test_rank_batches_split_each_step_by_tokens_and_keep_one_rank_as_scheduled():
    lengths = [5, 9, 3, 7, 7, 2, 8, 4, 6, 1]
    sched = Schedule(lengths, 12, seed=3)
    picks = [sched.micro_batch(g) for g in range(4)]
    assert rank_batches(picks, lengths, 12, 1) == [[idx for _, idx in picks]]
    shares = rank_batches(picks, lengths, 12, 2)
    assert shares == rank_batches(picks, lengths, 12, 2)  # the same on every rank
    step = sorted(i for _, idx in picks for i in idx)
    assert sorted(i for share in shares for mb in share for i in mb) == step  # every example once
    loads = [sum(lengths[i] for mb in share for i in mb) for share in shares]
    assert abs(loads[0] - loads[1]) <= max(lengths)
    assert all(sum(lengths[i] for i in mb) <= 12 for share in shares for mb in share)
    # a step spanning two epochs packs each epoch apart, as the global schedule does
    assert rank_batches([(0, [0, 1]), (1, [2, 3])], [1, 1, 1, 1], 12, 2) == [[[0], [2]], [[1], [3]]]


def test_sharded_runs_take_torch_adamw():
    sharded = Parallel(Group(0, 2, 0, "gloo"), "fsdp")
    assert sharded.optimizer_config(TrainConfig()).optimizer == "adamw"
    assert Parallel(Group(0, 2, 0, "gloo"), "ddp").optimizer_config(TrainConfig()).optimizer == "auto"
    with pytest.raises(InputError, match="--shard"):
        sharded.optimizer_config(TrainConfig(optimizer="paged_adamw_8bit"))
