"""Float "codecs" (f32, f16, bf16) behind the same quantize/dequantize contract as the quantized formats."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatCodec:
    """Raw little-endian float storage; ``imatrix`` is accepted and ignored."""

    dtype_name: str

    @property
    def dtype(self) -> torch.dtype:
        return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[self.dtype_name]

    def quantize(self, weight: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        return weight.to(self.dtype).contiguous().view(torch.uint8).reshape(weight.shape[0], -1)

    def dequantize(self, data: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return data.contiguous().view(self.dtype).to(dtype)


F32 = FloatCodec("f32")
F16 = FloatCodec("f16")
BF16 = FloatCodec("bf16")
