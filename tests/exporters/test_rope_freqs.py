"""The Llama-3 ``rope_freqs.weight`` tensor carries the same float32 bits as llama.cpp's converter writes."""

from __future__ import annotations

import struct

from quantforge.arch import llama3_rope_freqs

LLAMA31 = {"hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
SMOOTH_BITS = [1067093717, 1069995594, 1073852189, 1076654894, 1080806094, 1084767238]
"""float32 bits of entries 29..34 (the smoothed band) of ``rope_freqs.weight`` in the bf16 GGUF that
``convert_hf_to_gguf.py`` writes for Llama-3.1-8B's config, whose smoothing runs in float32 (torch scalars);
the same formula in float64 rounded once gives 1.2074840, 3.6842530 and 5.2573266 at 29, 33 and 34 (one ulp off)."""


def test_llama31_rope_freqs_bits_equal_llama_cpp():
    values = llama3_rope_freqs(LLAMA31).tolist()
    bits = [struct.unpack("<i", struct.pack("<f", v))[0] for v in values]
    assert len(values) == 64
    assert values[:29] == [1.0] * 29
    assert bits[29:35] == SMOOTH_BITS
    assert values[35:] == [8.0] * 29
