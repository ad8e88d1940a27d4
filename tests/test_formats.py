"""The format registry: cross-checked against gguf-py's table, duplicates refused, every codec importable."""

from __future__ import annotations

import gguf
import pytest

from quantforge.errors import RegistryError, UnsupportedFormat
from quantforge.formats import FORMATS, Family, QuantFormat, get_format, register


@pytest.mark.parametrize("fmt", [f for f in FORMATS.values() if f.ggml_type is not None], ids=lambda f: f.name)
def test_matches_gguf_table(fmt):
    qt = gguf.GGMLQuantizationType(fmt.ggml_type)
    assert gguf.GGML_QUANT_SIZES[qt] == (fmt.block_size, fmt.type_size)
    assert qt.name.lower() == fmt.name


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=lambda f: f.name)
def test_codec_imports(fmt):
    codec = fmt.load_codec()
    assert callable(codec.quantize) and callable(codec.dequantize)


def test_duplicates_refused():
    with pytest.raises(RegistryError):
        register(QuantFormat("q8_0", Family.GGUF, 32, 34, 999))
    with pytest.raises(RegistryError):
        register(QuantFormat("other", Family.GGUF, 32, 34, 8))


def test_unknown_and_misfit():
    with pytest.raises(UnsupportedFormat, match="expected one of"):
        get_format("q9_9")
    with pytest.raises(UnsupportedFormat, match="multiple of 256"):
        get_format("q4_k").nbytes((4, 576))
    assert get_format("q4_k").bits_per_weight == 4.5
