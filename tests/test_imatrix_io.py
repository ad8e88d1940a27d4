"""llama.cpp imatrix files in both forms (GGUF and legacy .dat) load to the same values and drive quantization."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from quantforge.exporters.gguf import export_gguf

from quantforge.errors import CorruptCheckpoint
from quantforge.imatrix import Imatrix, ImatrixEntry, load_imatrix, save_imatrix_gguf


def _write_dat(path, entries: dict[str, np.ndarray], ncall: int, dataset: str = "wiki.valid.raw"):
    """The legacy layout llama-imatrix writes: values = mean(x^2) * ncall."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name in sorted(entries):
            b = name.encode()
            f.write(struct.pack("<i", len(b)) + b)
            vals = (entries[name] * ncall).astype(np.float32)
            f.write(struct.pack("<ii", ncall, vals.size) + vals.tobytes())
        f.write(struct.pack("<i", 7))
        f.write(struct.pack("<i", len(dataset)) + dataset.encode())


def _smollm2_means(rng):
    names = [f"blk.{i}.{t}.weight" for i in range(30)
             for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")]
    out = {n: rng.uniform(0.01, 4.0, 576).astype(np.float32) for n in names}
    out.update({f"blk.{i}.ffn_down.weight": rng.uniform(0.01, 4.0, 1536).astype(np.float32) for i in range(30)})
    return out


def test_dat_and_gguf_forms_agree(tmp_path):
    rng = np.random.default_rng(0)
    means = _smollm2_means(rng)
    _write_dat(tmp_path / "m.dat", means, ncall=10)
    dat = load_imatrix(tmp_path / "m.dat")
    assert dat.chunk_count == 7 and dat.datasets == ["wiki.valid.raw"]
    imat = Imatrix({n: ImatrixEntry((v * 5120)[None, :], np.array([5120.0], np.float32)) for n, v in means.items()},
                   ["wiki.valid.raw"], 10, 512)
    save_imatrix_gguf(imat, tmp_path / "m.gguf")
    back = load_imatrix(tmp_path / "m.gguf")
    assert back.chunk_count == 10 and back.chunk_size == 512
    for n, v in means.items():
        np.testing.assert_allclose(dat.for_tensor(n), v, rtol=1e-6)
        np.testing.assert_allclose(back.for_tensor(n), v, rtol=1e-6)


def test_imatrix_changes_quantization_identically(smollm2_dir, tmp_path):
    rng = np.random.default_rng(1)
    means = {n: np.float32(2.0) ** np.round(np.log2(v)) for n, v in _smollm2_means(rng).items()}
    _write_dat(tmp_path / "m.dat", means, ncall=4)
    imat = Imatrix({n: ImatrixEntry((v * 64)[None, :], np.array([64.0], np.float32)) for n, v in means.items()})
    save_imatrix_gguf(imat, tmp_path / "m.gguf")
    plain = export_gguf(smollm2_dir, tmp_path / "plain.gguf", qtype="q4_0")
    a = export_gguf(smollm2_dir, tmp_path / "a.gguf", qtype="q4_0", imatrix=tmp_path / "m.dat")
    b = export_gguf(smollm2_dir, tmp_path / "b.gguf", qtype="q4_0", imatrix=tmp_path / "m.gguf")
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (plain, a, b)}
    assert digest["plain.gguf"] != digest["a.gguf"]
    import gguf

    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert ta.name == tb.name and np.array_equal(np.array(ta.data), np.array(tb.data)), ta.name
    # with an imatrix, llama.cpp's q4_0 mix gives the first n_layer/8 ffn_down tensors q4_1
    types = {t.name: t.tensor_type.name for t in ra.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_1" and types["blk.10.ffn_down.weight"] == "Q4_0"


def test_truncated_dat_is_rejected(tmp_path):
    _write_dat(tmp_path / "m.dat", {"blk.0.attn_q.weight": np.ones(576, np.float32)}, ncall=1)
    data = (tmp_path / "m.dat").read_bytes()
    (tmp_path / "bad.dat").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint):
        load_imatrix(tmp_path / "bad.dat")
