"""The whole pipeline on SmolLM2 as a user runs it: ``quantforge calibrate`` on a little WikiText-2 text (cheap
settings: 512 tokens in chunks of 128, three candidates, Fisher prediction only), ``quantforge plan`` at the size
of our q4_k_m, ``quantforge quantize --plan``. The file has exactly the planned types and bytes within the budget,
was quantized with the calibration's importance matrix, and llama.cpp runs it close to the HF model."""

from __future__ import annotations

import pytest
import yaml
from helpers.reference import compare_logits, hf_logits, llama_cpp_logits, llama_cpp_tokenize

from quantforge.cli.main import main

# Measured on this pipeline: KL divergence 0.0038 and top-1 agreement 0.977 over 128 WikiText-2 test tokens.
MAX_KLD = 0.0045
MIN_TOP1 = 0.96


@pytest.mark.slow
def test_calibrate_plan_quantize(smollm2_dir, data_dir, tmp_path):
    import gguf

    text = tmp_path / "calib.txt"
    text.write_text((data_dir / "wikitext-2" / "wiki.valid.raw").read_text(encoding="utf-8")[:12000])
    cal, plan, out = tmp_path / "cal", tmp_path / "plan.yaml", tmp_path / "planned.gguf"
    assert main(["calibrate", str(smollm2_dir), "--data", str(text), "-o", str(cal), "--tokens", "512", "--ctx", "128",
                 "--holdout-tokens", "128", "--candidates", "q3_k,q4_k,q6_k", "--measure", "none",
                 "--fisher-draws", "1", "--proxy-rows", "64"]) == 0
    assert main(["plan", str(smollm2_dir), "--calibration", str(cal), "--target", "gguf", "--like", "q4_k_m",
                 "-o", str(plan)]) == 0
    assert main(["quantize", str(smollm2_dir), "--format", "gguf", "--plan", str(plan), "-o", str(out)]) == 0

    planned = yaml.safe_load(plan.read_text())
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    assert {n: c["type"] for n, c in planned["tensors"].items()} == {n: types[n] for n in planned["tensors"]}
    assert len(set(types.values())) >= 3  # the plan mixes formats
    data_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    assert data_bytes == planned["predicted"]["tensor_bytes"] <= planned["budget"]["bytes"]
    assert reader.fields["quantize.imatrix.file"].contents() == "imatrix.gguf"

    ids = llama_cpp_tokenize(out, [(data_dir / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")[:1500]])
    ids = ids[0][:128]
    stats = compare_logits(hf_logits(smollm2_dir, ids), llama_cpp_logits(out, ids))
    assert stats["kld"] < MAX_KLD and stats["top1"] >= MIN_TOP1, stats
