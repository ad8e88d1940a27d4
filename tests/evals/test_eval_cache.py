"""The reference side of ``quantforge eval`` is cached on disk: a second run against the same reference reads its
logits and task results back without loading the reference model, and gives the same numbers as a fresh run."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from quantforge.cli.main import main

FAST = ["--ctx", "128", "--chunks", "2", "--threads", "1"]


def _main(argv):
    import torch

    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    torch.set_num_threads(threads)
    return rc, err.getvalue()


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("QUANTFORGE_CACHE", str(root))
    return root / "eval"


def test_second_artifact_reads_the_cached_reference(tmp_path, cache_home, smollm2_dir, smol_gguf, data_dir,
                                                    monkeypatch):
    q8 = smol_gguf("q8_0")
    other = tmp_path / "copy-q8_0.gguf"
    shutil.copy(q8, other)
    first = tmp_path / "first.json"
    rc, err = _main(["eval", str(q8), "--reference", str(smollm2_dir), *FAST, "--tasks", "arc_easy", "--limit", "2",
                     "-o", str(first)])
    assert rc == 0, err[-2000:]
    entries = sorted(p.name.split("-")[0] for p in cache_home.iterdir())
    assert entries == ["ref", "tasks"]

    import quantforge.evals.engines as engines

    real_load_hf = engines.load_hf

    def no_reference(path, *a, **k):
        if str(path) == str(smollm2_dir):
            raise AssertionError("the reference model was loaded although its results are cached")
        return real_load_hf(path, *a, **k)

    monkeypatch.setattr(engines, "load_hf", no_reference)
    second = tmp_path / "second.json"
    rc, err = _main(["eval", str(other), "--reference", str(smollm2_dir), *FAST, "--tasks", "arc_easy", "--limit",
                     "2", "-o", str(second)])
    assert rc == 0, err[-2000:]
    assert "from the cache" in err
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a["settings"]["reference_from_cache"] is False and b["settings"]["reference_from_cache"] is True
    assert a["reference"]["metrics"] == b["reference"]["metrics"]
    assert a["artifacts"][0]["metrics"] == b["artifacts"][0]["metrics"]  # same file, same numbers, cached or not
    assert a["tasks"] == b["tasks"]


def test_cache_key_follows_settings_and_model(tmp_path, cache_home, smollm2_dir, smollm2_dithered_dir, smol_gguf,
                                              data_dir):
    """Another reference with the same shapes, config and file sizes (the dithered fixture) is a new entry, never a
    reuse; so is any change of engine, text, context or chunk count."""
    from quantforge.evals import cache

    q8 = smol_gguf("q8_0")
    for i, ref in enumerate((smollm2_dir, smollm2_dithered_dir)):
        out = tmp_path / f"r{i}.json"
        rc, err = _main(["eval", str(q8), "--reference", str(ref), "--ctx", "128", "--chunks", "1", "--threads", "1",
                         "-o", str(out)])
        assert rc == 0, err[-2000:]
        assert json.loads(out.read_text())["settings"]["reference_from_cache"] is False
    assert len([p for p in cache_home.iterdir() if p.name.startswith("ref-")]) == 2
    engine = {"engine": None, "dtype": None, "device": "cpu", "flash_attn": True, "batch_size": 1}
    base = cache.reference_key(smollm2_dir, engine, "abc", 512, 8)
    assert base == cache.reference_key(smollm2_dir, dict(engine), "abc", 512, 8)
    assert len({base, cache.reference_key(smollm2_dir, engine, "abd", 512, 8),
                cache.reference_key(smollm2_dir, engine, "abc", 256, 8),
                cache.reference_key(smollm2_dir, engine, "abc", 512, 9),
                cache.reference_key(smollm2_dir, {**engine, "dtype": "bfloat16"}, "abc", 512, 8)}) == 5


def test_no_cache_writes_nothing(tmp_path, cache_home, smollm2_dir, smol_gguf, data_dir):
    out = tmp_path / "r.json"
    rc, err = _main(["eval", str(smol_gguf("q8_0")), "--reference", str(smollm2_dir), "--ctx", "128", "--chunks",
                     "1", "--threads", "1", "--no-cache", "-o", str(out)])
    assert rc == 0, err[-2000:]
    assert not cache_home.exists()


def test_prefix_tokenization_gives_the_whole_texts_chunks(hf_engine, data_dir):
    """With a chunk count only a prefix of WikiText-2 is tokenized; its chunks equal those of the whole text."""
    from quantforge.evals import distribution, metrics
    from quantforge.evals.data import wikitext2_test

    text = wikitext2_test().read_text(encoding="utf-8")
    whole = metrics.make_chunks(hf_engine.encode(text), 512, 8, hf_engine.bos_id if hf_engine.add_bos else None)
    assert distribution.prepare_chunks(hf_engine, text, 512, 8) == whole
