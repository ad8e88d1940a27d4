"""Every reader of an input file answers a damaged file with a typed error (an ``InputError``: exit 2 at the CLI)
within a second of CPU time and without a large allocation: never an untyped exception, a hang or a huge buffer.

Hypothesis mutates a small valid file of each kind (truncations, bit flips, huge lengths and counts and wrong type
ids written over the file's own fields, random overwrites; for the plan and the safetensors header also
well-formed documents with wrong-typed values) and runs the reader on each variant:

* GGUF: ``quantforge.gguf_reader.open_gguf`` / ``load_hf_state_dict`` and ``quantforge.inspect.describe``;
* plan files: ``quantforge.plan.load_plan``;
* imatrix: ``quantforge.imatrix.load_imatrix`` on the GGUF form and on the legacy ``.dat`` form;
* safetensors: ``quantforge.model_source.ModelSource.open`` (the header path) and reading every tensor.

The number of cases per reader is printed at the end of the test run.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from helpers.fuzz import CASES, Field, gguf_fields, mutations, run_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantforge.errors import InputError

CASES_PER_READER = 500
FUZZ = settings(max_examples=CASES_PER_READER, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def _expect_cases(reader: str, before: int) -> None:
    assert CASES[reader] - before >= CASES_PER_READER, f"{reader}: {CASES[reader] - before} cases"


def _tiny_gguf(path: Path) -> Path:
    """A one-layer llama GGUF of a few KiB: string and float arrays, f32, f16 and q8_0 tensors."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(8)
    w.add_token_list([f"t{i}" for i in range(8)])
    w.add_token_scores([float(i) for i in range(8)])
    w.add_bos_token_id(1)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 32), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    q = gguf.quants.quantize(rng.standard_normal((32, 32), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_k.weight", rng.standard_normal((16, 32), dtype=np.float32).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_reader_and_inspect(tmp_path):
    from quantforge.gguf_reader import load_hf_state_dict
    from quantforge.inspect import describe

    seed = _tiny_gguf(tmp_path / "seed.gguf")
    data = seed.read_bytes()
    cfg, state = load_hf_state_dict(seed)  # the seed itself reads
    assert cfg["hidden_size"] == 32 and state["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)
    fields = gguf_fields(seed)
    case = tmp_path / "case.gguf"
    before = CASES["gguf"]

    @FUZZ
    @given(mutations(data, fields))
    def run(blob: bytes) -> None:
        case.write_bytes(blob)

        def read() -> None:
            try:
                describe(case)
            finally:
                load_hf_state_dict(case)

        run_case("gguf", read, InputError)

    run()
    _expect_cases("gguf", before)


def _imatrix(path: Path) -> Path:
    from quantforge.imatrix import Imatrix, ImatrixEntry, save_imatrix_gguf

    rng = np.random.default_rng(1)
    entries = {f"blk.0.{n}.weight": ImatrixEntry(rng.uniform(0, 4, (1, 32)).astype(np.float32),
                                                 np.array([16.0], dtype=np.float32)) for n in ("attn_q", "ffn_down")}
    save_imatrix_gguf(Imatrix(entries, ["calib.txt"], 4, 512), path)
    return path


def test_imatrix_gguf_reader(tmp_path):
    from quantforge.imatrix import load_imatrix

    seed = _imatrix(tmp_path / "seed.gguf")
    assert sorted(load_imatrix(seed).entries) == ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"]
    data, fields = seed.read_bytes(), gguf_fields(seed)
    case = tmp_path / "case.gguf"
    before = CASES["imatrix.gguf"]

    @FUZZ
    @given(mutations(data, fields))
    def run(blob: bytes) -> None:
        case.write_bytes(blob)
        run_case("imatrix.gguf", lambda: load_imatrix(case), InputError)

    run()
    _expect_cases("imatrix.gguf", before)


def _dat() -> tuple[bytes, list[Field]]:
    """A legacy .dat imatrix (two entries, chunk count, dataset name) and its length fields."""
    out, fields = bytearray(struct.pack("<i", 2)), [Field(0, 4, "length")]
    for i, name in enumerate((b"blk.0.attn_q.weight", b"blk.0.ffn_down.weight")):
        fields.append(Field(len(out), 4, "length"))
        out += struct.pack("<i", len(name)) + name
        fields += [Field(len(out), 4, "length"), Field(len(out) + 4, 4, "length")]
        out += struct.pack("<ii", 3, 16) + np.full(16, 0.5 + i, dtype=np.float32).tobytes()
    out += struct.pack("<i", 5)
    fields.append(Field(len(out), 4, "length"))
    out += struct.pack("<i", 9) + b"calib.txt"
    return bytes(out), fields


def test_imatrix_dat_reader(tmp_path):
    from quantforge.imatrix import load_imatrix

    data, fields = _dat()
    (tmp_path / "seed.dat").write_bytes(data)
    seed = load_imatrix(tmp_path / "seed.dat")
    assert seed.chunk_count == 5 and seed.datasets == ["calib.txt"] and len(seed.entries) == 2
    case = tmp_path / "case.dat"
    before = CASES["imatrix.dat"]

    @FUZZ
    @given(mutations(data, fields))
    def run(blob: bytes) -> None:
        case.write_bytes(blob)
        run_case("imatrix.dat", lambda: load_imatrix(case), InputError)

    run()
    _expect_cases("imatrix.dat", before)


_SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6) | st.integers(-3, 3), inner, max_size=3), max_leaves=8)
_PLAN = {"version": 1, "target": "gguf", "base_type": "q4_k_m", "model": "m", "budget": {"bpw": 4.5},
         "tensors": {"blk.0.attn_v.weight": {"type": "q6_k", "predicted_kld": 0.001, "bytes": 1024},
                     "blk.0.ffn_down.weight": "q5_k"}}


def _plan_documents() -> st.SearchStrategy[bytes]:
    """The plan with one key (top level or inside a tensor entry) set to an arbitrary YAML value, or added."""
    import copy

    import yaml

    def put(where: str, key: str | int, value: object) -> bytes:
        doc = copy.deepcopy(_PLAN)
        target = doc if where == "top" else doc["tensors"]["blk.0.attn_v.weight"]
        target[key] = value
        return yaml.safe_dump(doc, sort_keys=False).encode()

    keys = st.sampled_from(["version", "target", "base_type", "tensors", "skip_modules", "quant_type",
                            "double_quant", "budget", "calibration", "model", "notes", "type", "bytes"])
    return st.builds(put, st.sampled_from(["top", "tensor"]), keys | st.integers(-2, 2) | st.text(max_size=5),
                     _VALUES)


def test_plan_loader(tmp_path):
    import yaml

    from quantforge.plan import load_plan

    data = yaml.safe_dump(_PLAN, sort_keys=False).encode()
    (tmp_path / "seed.yaml").write_bytes(data)
    assert load_plan(tmp_path / "seed.yaml", target="gguf").gguf_types()["blk.0.ffn_down.weight"] == "q5_k"
    case = tmp_path / "case.yaml"
    before = CASES["plan"]
    laughs = "".join(f"{k}: &{k} [{', '.join([f'*{p}' if p else 'x'] * 9)}]\n"
                     for p, k in zip(["", *"abcdefgh"], "abcdefghi", strict=True))
    for hostile in ("[" * 20000 + "]" * 20000,  # deeper than the YAML composer can recurse
                    "version: 1\ntarget: gguf\n1: a\nb: 2\n",  # unknown keys of mixed types
                    "version: 1\ntarget: gguf\ntensors: {t: {type: q4_k, 1: a, b: 2}}\n",
                    laughs + "version: 1\ntarget: gguf\nbudget: {x: *i}\ntensors: {t: {type: q4_k, bytes: *i}}\n"):
        case.write_text(hostile)
        run_case("plan", lambda: load_plan(case), InputError)

    @FUZZ
    @given(mutations(data, []) | _plan_documents())
    def run(blob: bytes) -> None:
        case.write_bytes(blob)

        def read() -> None:
            try:
                load_plan(case)
            finally:
                load_plan(case, target="bnb4")

        run_case("plan", read, InputError)

    run()
    _expect_cases("plan", before)


def _safetensors(folder: Path) -> tuple[bytes, dict]:
    from safetensors.numpy import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    save_file({"a.weight": np.arange(24, dtype=np.float32).reshape(4, 6), "b.bias": np.ones(6, dtype=np.float16),
               "c.idx": np.arange(3, dtype=np.int64)}, str(folder / "model.safetensors"))
    data = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data, json.loads(data[8:8 + n])


def _header_documents(data: bytes, header: dict) -> st.SearchStrategy[bytes]:
    """The file with one header entry's field set to an arbitrary JSON value (the header length kept right)."""
    import copy

    (n,) = struct.unpack("<Q", data[:8])
    body = data[8 + n:]
    json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=6),
                               lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                         max_size=3), max_leaves=8)

    def put(name: str, key: str, value: object) -> bytes:
        doc = copy.deepcopy(header)
        if key == "":
            doc[name] = value
        else:
            doc[name][key] = value
        text = json.dumps(doc).encode()
        return struct.pack("<Q", len(text)) + text + body

    names = st.sampled_from(sorted(header))
    keys = st.sampled_from(["dtype", "shape", "data_offsets", "", "extra"])
    return st.builds(put, names, keys, json_values)


def test_safetensors_header(tmp_path):
    from quantforge.model_source import ModelSource

    data, header = _safetensors(tmp_path / "seed")
    src = ModelSource.open(tmp_path / "seed")
    assert src.get("a.weight").tolist()[1] == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    src.close()
    folder = tmp_path / "case"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "seed" / "config.json").read_text())
    before = CASES["safetensors"]

    @FUZZ
    @given(mutations(data, [Field(0, 8, "length")]) | _header_documents(data, header))
    def run(blob: bytes) -> None:
        (folder / "model.safetensors").write_bytes(blob)

        def read() -> None:
            src = ModelSource.open(folder)
            try:
                for name in src.tensors:
                    src.get(name)
            finally:
                src.close()

        run_case("safetensors", read, InputError)

    run()
    _expect_cases("safetensors", before)
