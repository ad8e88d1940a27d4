"""BulkGGUFWriter packs metadata arrays in bulk and must give the stock gguf writer's bytes exactly."""

from __future__ import annotations

import gguf
import pytest
from quantforge.exporters.gguf.bulk_writer import BulkGGUFWriter

ARRAYS = {
    "tokens": ["<|im_start|>", "Ġthe", "héllo", "日本語", "", " ", "\u0120\n", "🙂"] * 20,
    "types": [1, 3, 4, 6, -7, 2**31 - 1, -(2**31)] * 20,
    "scores": [0.0, -1000.0, 3.25, 1e-8, -0.1, 1e38, float("inf")] * 20,
    "flags": [True, False] * 40,
    "short": ["a", "b"],
    "too_big_for_int32": [2**31] * 100,
}


def _write(cls: type, path, arrays: dict) -> bytes:
    w = cls(str(path), "llama")
    for key, values in arrays.items():
        w.add_array(f"test.{key}", values)
    w.add_token_merges(["Ġ t", "h e", "Ġt he"] * 30)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path.read_bytes()


def test_same_bytes_as_stock_writer(tmp_path):
    ok = {k: v for k, v in ARRAYS.items() if k != "too_big_for_int32"}
    assert _write(BulkGGUFWriter, tmp_path / "bulk.gguf", ok) == _write(gguf.GGUFWriter, tmp_path / "stock.gguf", ok)
    reader = gguf.GGUFReader(str(tmp_path / "bulk.gguf"))
    assert reader.fields["test.tokens"].contents() == ARRAYS["tokens"]


@pytest.mark.parametrize("key,values", [
    ("too_big_for_int32", ARRAYS["too_big_for_int32"]),
    ("mixed", ["a", 1] * 40),
    ("float_beyond_f32", [1e39] * 80),
])
def test_out_of_range_or_mixed_arrays_behave_as_stock(tmp_path, key, values):
    def outcome(cls: type, name: str):
        try:
            return _write(cls, tmp_path / name, {key: values})
        except Exception as exc:  # the stock writer's own error, whatever it is
            return type(exc)

    assert outcome(BulkGGUFWriter, "bulk.gguf") == outcome(gguf.GGUFWriter, "stock.gguf")
