"""Scale-out on CPU with gloo: two ranks, started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in the environment), give the same GGUF bytes, importance matrix and sensitivity table as one
process; a failure on the rank that does not write reaches rank 0 with its type. Plus the pure helpers.

The ranks run one worker process each (``WORKER`` below): the CLI's ``calibrate`` and ``quantize`` and the
library's ``write_gguf`` with small row chunks (so row ranges of one tensor land on different ranks), all in
one process group to keep process start-ups (torch imports) to two.
"""

from __future__ import annotations

import json
import math
import shutil
import time

import pytest
from helpers.spawn import run_ranks

from quantforge import distributed
from quantforge.errors import CorruptCheckpoint, InputError

CAL = dict(tokens=128, ctx=32, holdout_tokens=64, candidates=["q4_0"], measure="sample", sample_layers=1,
           fisher_draws=1, proxy_rows=16)
BATCH = 1  # 4 calibration chunks -> 4 batches, 2 per rank
NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"  # encoded by rank 1 (after rank 0's share of token_embd)

WORKER = r"""
import json, os, sys
import torch.distributed
from quantforge import distributed
from quantforge.cli.main import main
from quantforge.exporters.gguf.writer import write_gguf
from quantforge.model_source import ModelSource

cfg = json.loads(sys.argv[1])
group = distributed.init_from_env("cpu", timeout_s=120)
codes = {"world": group.world, "backend": group.backend}
codes["calibrate"] = main(["calibrate", cfg["model"], "--data", cfg["data"], "-o", cfg["cal"], *cfg["cal_args"]])
codes["q4_k_m"] = main(["quantize", cfg["model"], "--type", "q4_k_m", "--imatrix", cfg["imatrix"],
                        "-o", cfg["out"] + "/q4_k_m.gguf"])
src = ModelSource.open(cfg["model"])
write_gguf(src, cfg["out"] + "/q8_0.gguf", "q8_0", chunk_elems=4096)
codes["nan"] = main(["quantize", cfg["nan_model"], "--type", "q8_0", "-o", cfg["out"] + "/nan.gguf"])
os.environ["QUANTFORGE_SHARED_FS"] = "0"  # the path for ranks on separate nodes: rank 0 receives and writes
write_gguf(src, cfg["out"] + "/q8_0-sent.gguf", "q8_0", chunk_elems=4096)
codes["nan_sent"] = main(["quantize", cfg["nan_model"], "--type", "q8_0", "-o", cfg["out"] + "/nan-sent.gguf"])
src.close()
json.dump(codes, open(cfg["out"] + f"/rank{group.rank}.json", "w"))
torch.distributed.destroy_process_group()
"""


def cal_args() -> list[str]:
    return ["--tokens", str(CAL["tokens"]), "--ctx", str(CAL["ctx"]), "--holdout-tokens", str(CAL["holdout_tokens"]),
            "--candidates", ",".join(CAL["candidates"]), "--measure", CAL["measure"],
            "--sample-layers", str(CAL["sample_layers"]), "--fisher-draws", str(CAL["fisher_draws"]),
            "--proxy-rows", str(CAL["proxy_rows"]), "--batch-size", str(BATCH)]


# ---------------------------------------------------------------- pure helpers


def test_partition_is_deterministic_balanced_and_interleaved():
    costs = [5.0, 1, 1, 1, 3, 3, 2, 8, 1, 1, 1, 1]
    owners = distributed.partition(costs, 3)
    assert owners == distributed.partition(costs, 3)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == k) for k in range(3)]
    assert max(loads) - min(loads) <= max(costs)
    assert distributed.partition([1.0] * 6, 2) == [0, 1, 0, 1, 0, 1]
    assert distributed.partition([], 2) == []
    with pytest.raises(InputError):
        distributed.partition([1.0], 0)


def test_shard_batches_keeps_batches_whole():
    items = list(range(10))
    g = [distributed.Group(r, 3, r, "gloo") for r in range(3)]
    shares = [distributed.shard_batches(items, 2, x) for x in g]
    assert shares == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5]]
    assert distributed.shard_batches(items, 4, distributed.SINGLE) == items


def test_ordered_map_keeps_order_and_raises_in_order():
    def slow_square(x, dev):
        time.sleep(0.002 * (x % 3))
        if x == 7:
            raise CorruptCheckpoint("bad item 7")
        return (x * x, dev)

    got = list(distributed.ordered_map(slow_square, list(range(7)), ["a", "b", "c"], depth=1))
    assert [v for v, _ in got] == [x * x for x in range(7)]
    assert {d for _, d in got} == {"a", "b", "c"}
    seen = []
    with pytest.raises(CorruptCheckpoint, match="bad item 7"):
        for v, _ in distributed.ordered_map(slow_square, list(range(12)), ["a", "b"], depth=1):
            seen.append(v)
    assert seen == [x * x for x in range(7)]


def test_threaded_ordered_map_starts_before_the_first_next_and_close_stops_it():
    import threading

    started = threading.Event()
    done = []

    def work(x, dev):
        started.set()
        done.append(x)
        return x

    results = distributed.ordered_map(work, list(range(50)), ["cpu"], depth=1, threaded=True)
    assert started.wait(5), "the worker did not start before the first result was asked for"
    results.close()  # never iterated: the worker must stop, not block forever on its full queue
    assert all(not t.is_alive() for t in results.threads)
    assert len(done) < 50
    assert list(results) == []


def test_shares_files_follows_torchrun_nodes_unless_forced():
    group = distributed.Group(rank=1, world=4, local_rank=1, backend="gloo")
    assert distributed.shares_files(group, {"LOCAL_WORLD_SIZE": "4"})  # one node
    assert not distributed.shares_files(group, {"LOCAL_WORLD_SIZE": "2"})  # two nodes
    assert not distributed.shares_files(group, {})
    assert distributed.shares_files(group, {"LOCAL_WORLD_SIZE": "2", "QUANTFORGE_SHARED_FS": "1"})
    assert not distributed.shares_files(group, {"LOCAL_WORLD_SIZE": "4", "QUANTFORGE_SHARED_FS": "0"})


def test_env_world_and_single_process_group(monkeypatch):
    assert distributed.env_world({}) == (0, 1, 0)
    assert distributed.env_world({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(distributed.DistributedError):
        distributed.env_world({"WORLD_SIZE": "2", "RANK": "2"})
    g = distributed.current()
    assert g == distributed.SINGLE and g.is_main and not g.distributed
    assert g.on_main(lambda: 41) + 1 == 42 and g.broadcast_object("x") == "x" and g.all_gather_object(1) == [1]
    assert distributed.parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    with pytest.raises(InputError):
        distributed.parse_devices("gpu0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(distributed.DistributedError, match="MASTER_ADDR"):
        distributed.init_from_env("cpu")


# ---------------------------------------------------------------- one process vs two ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm2_dir, data_dir):
    """The single-process artifacts (in this process) and the 2-rank ones (two worker processes)."""
    import torch
    from helpers.reference import tiny_checkpoint
    from quantforge.calibration.pipeline import CalibrationSettings, calibrate
    from quantforge.exporters.gguf.writer import write_gguf
    from safetensors.torch import load_file, save_file

    from quantforge.model_source import ModelSource

    root = tmp_path_factory.mktemp("dist")
    model = tiny_checkpoint("llama", root / "tiny", smollm2_dir)
    nan_model = root / "tiny-nan"
    shutil.copytree(model, nan_model)
    weights = load_file(nan_model / "model.safetensors")
    weights[NAN_TENSOR][3, 5] = float("nan")
    save_file(weights, nan_model / "model.safetensors", metadata={"format": "pt"})
    data = data_dir / "wikitext-2" / "wiki.valid.raw"

    one = root / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the workers (OMP_NUM_THREADS=1): tiny tensors, shared cores
    try:
        calibrate(model, [data], one / "cal", CalibrationSettings(**CAL), batch_size=BATCH)
        imatrix = one / "cal" / "imatrix.gguf"
        src = ModelSource.open(model)
        write_gguf(src, one / "q4_k_m.gguf", "q4_k_m", imatrix=imatrix)
        write_gguf(src, one / "q8_0.gguf", "q8_0")
        src.close()
    finally:
        torch.set_num_threads(threads)

    two = root / "two"
    two.mkdir()
    cfg = {"model": str(model), "nan_model": str(nan_model), "data": str(data), "cal": str(two / "cal"),
           "cal_args": cal_args(), "imatrix": str(imatrix), "out": str(two)}
    logs = run_ranks(WORKER, cfg, root)
    codes = [json.loads((two / f"rank{r}.json").read_text()) for r in range(2)]
    return one, two, codes, logs


def test_two_ranks_write_the_same_gguf_bytes(runs):
    one, two, codes, logs = runs
    assert [c["world"] for c in codes] == [2, 2] and codes[0]["backend"] == "gloo"
    assert [c["q4_k_m"] for c in codes] == [0, 0]
    for name, other in (("q4_k_m.gguf", "q4_k_m.gguf"), ("q8_0.gguf", "q8_0.gguf"), ("q8_0.gguf", "q8_0-sent.gguf")):
        a, b = (one / name).read_bytes(), (two / other).read_bytes()
        assert len(a) == len(b) and a == b, other
    assert "wrote" in logs[0][1] and "wrote" not in logs[1][1]  # only rank 0 reports


def test_failure_on_another_rank_reaches_rank_0_with_its_type(runs):
    _, two, codes, logs = runs
    assert [c["nan"] for c in codes] == [2, 2] and [c["nan_sent"] for c in codes] == [2, 2]
    err0 = logs[0][2]
    assert err0.count("rank 1:") == 2 and "NaN" in err0 and NAN_TENSOR in err0, err0[-2000:]
    for name in ("nan.gguf", "nan-sent.gguf"):
        assert not (two / name).exists() and not list(two.glob(f".{name}*")), name


def test_two_ranks_calibrate_the_same_imatrix_and_sensitivity(runs):
    from quantforge.imatrix import load_imatrix

    one, two, codes, _ = runs
    assert [c["calibrate"] for c in codes] == [0, 0]
    a, b = load_imatrix(one / "cal" / "imatrix.gguf"), load_imatrix(two / "cal" / "imatrix.gguf")
    assert (a.chunk_count, a.chunk_size, a.datasets) == (b.chunk_count, b.chunk_size, b.datasets)
    assert sorted(a.entries) == sorted(b.entries) and len(a.entries) == 14
    for name, e in a.entries.items():
        f = b.entries[name]
        assert (e.counts == f.counts).all(), name
        # float64 sums added in another order, then rounded to float32: equal to 1 ulp
        assert abs(e.in_sum2 - f.in_sum2).max() <= 2e-7 * abs(e.in_sum2).max(), name
    ta = json.loads((one / "cal" / "sensitivity.json").read_text())
    tb = json.loads((two / "cal" / "sensitivity.json").read_text())
    assert ta["n_measured"] == tb["n_measured"] > 0 and ta["holdout"] == tb["holdout"]
    assert list(ta["tensors"]) == list(tb["tensors"])
    for name, ea in ta["tensors"].items():
        eb = tb["tensors"][name]
        assert list(ea["candidates"]) == list(eb["candidates"]), name
        for fmt, ca in ea["candidates"].items():
            cb = eb["candidates"][fmt]
            assert list(ca) == list(cb), (name, fmt)
            for key, va in ca.items():
                assert _close(va, cb[key]), (name, fmt, key, va, cb[key])
    assert _close(ta["fit"], tb["fit"]), (ta["fit"], tb["fit"])


def _close(a, b) -> bool:
    """Equal, floats to 1e-5 relative (the imatrix entering the proxies may differ in its last bit)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12)
    return a == b


def test_one_process_driving_two_devices_writes_the_same_bytes(runs, tmp_path):
    from quantforge.exporters.gguf.writer import write_gguf

    from quantforge.model_source import ModelSource

    one, *_ = runs
    src = ModelSource.open(one.parent / "tiny")
    try:
        out = write_gguf(src, tmp_path / "q8_0.gguf", "q8_0", devices=["cpu", "cpu"], chunk_elems=4096)
    finally:
        src.close()
    assert out.read_bytes() == (one / "q8_0.gguf").read_bytes()
