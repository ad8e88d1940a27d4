"""GGUF export straight from safetensors (no llama.cpp checkout): names, metadata, tokenizer, quantized data."""

from .writer import export_gguf

__all__ = ["export_gguf"]
