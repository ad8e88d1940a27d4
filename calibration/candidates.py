"""Which formats a tensor may take, and what a tensor looks like after a round trip through one.

GGUF candidates come from the registry and are filtered by row length: a 576-wide row cannot hold a 256-weight
K-quant block, so a requested K type is replaced by llama.cpp's fallback (``presets.FALLBACK``) and the 32-block
legacy and IQ4 types are offered as well. ``f16`` is always the top (zero cost). ``nf4`` is the bitsandbytes
candidate of a Dynamic 4-bit plan (linear modules only).

The 1- to 3-bit i-quants are default candidates, so plans can reach 1.5-3 bits per weight. A tensor without an
imatrix (``has_imatrix``; the token embedding and output, which the imatrix pass does not record) is offered none of
the types that need one for it (``presets.needs_imatrix``: llama-quantize exempts token_embd and output, ggml does
not for IQ1_S, IQ2_XXS and IQ2_XS).
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedFormat
from ..formats import FORMATS, Family, get_format
from ..presets import FALLBACK, needs_imatrix

#: The 1- to 3-bit i-quants (lowest bits first).
LOW_BIT_CANDIDATES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s")
DEFAULT_CANDIDATES = (*LOW_BIT_CANDIDATES, "q2_k", "q3_k", "iq4_xs", "q4_k", "q5_k", "q6_k", "q8_0", "nf4")
SMALL_ROW_TYPES = ("q4_0", "iq4_nl", "q4_1", "q5_0", "q5_1", "q8_0")
TOP = "f16"


def parse_candidates(text: str | None) -> list[str]:
    """``"q4_k,q6_k"`` -> validated format names (the default set when ``text`` is empty)."""
    names = [t.strip().lower() for t in (text or "").split(",") if t.strip()] or list(DEFAULT_CANDIDATES)
    for n in names:
        get_format(n)
    return list(dict.fromkeys(names))


def gguf_candidates(requested: list[str], n_per_row: int, has_imatrix: bool = True, tensor: str = "") -> list[str]:
    """GGUF formats to try for rows of ``n_per_row``, lowest bits first, always ending with ``f16``; without an
    imatrix for ``tensor`` (GGUF name), none of the types that need one for it."""
    out: list[str] = []
    requested = [n for n in requested if has_imatrix or not needs_imatrix(n, tensor)]
    for name in requested:
        fmt = get_format(name)
        if fmt.family is Family.BNB:
            continue
        if fmt.fits(n_per_row):
            out.append(name)
        elif FALLBACK.get(name) and get_format(FALLBACK[name]).fits(n_per_row):
            out.append(FALLBACK[name])
    if any(not get_format(n).fits(n_per_row) for n in requested if get_format(n).family is Family.GGUF):
        out.extend(t for t in SMALL_ROW_TYPES if get_format(t).fits(n_per_row))
    out = [t for t in dict.fromkeys(out) if t not in ("f32", "bf16", TOP)]
    out.sort(key=lambda t: (FORMATS[t].bits_per_weight, t))
    return [*out, TOP]


HOST_ENCODED = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq1_s", "iq1_m")
"""Types whose round trips for a GPU weight are encoded by the host's C kernels (same bytes; the decode stays on
the GPU). Calibration makes many small round trips of every candidate, most of them of a sampled layer, where the
host's 16 cores encode a K-quant or Q8_0 in 3-15 ms. On the GPU, Q4_K to Q8_0 would save at most about 0.3 s per
whole tensor and 0.01 s per sampled layer, against a first-use compile of 0.4-1.6 s per type and imatrix use on a
fresh machine; Q2_K and Q3_K are faster on the host at the sampled shapes (``benchmarks/codec_placement.py``,
``benchmarks/compile_time.py``). The IQ1 split searches in PyTorch hold a whole tensor's split table on the GPU
(out of memory at 58M weights on an idle H200). The other i-quants stay on the GPU, where their encoders are 3-40x
faster than the host's."""


def fake_quantize(weight: Any, fmt: str, imatrix: Any = None) -> Any:
    """``weight`` (2-D, rows along the last dim) encoded as ``fmt`` and decoded back to float32, on the weight's
    device (:data:`HOST_ENCODED` types of a GPU weight are encoded on the host).

    The imatrix (per-column mean of squares) is passed exactly as the GGUF exporter passes it: only to formats
    that take one.
    """
    import torch

    w = weight.detach().to(torch.float32).contiguous()
    if fmt == "nf4":
        return nf4_round_trip(w)
    f = get_format(fmt)
    if f.family is Family.BNB:
        raise UnsupportedFormat(f"{fmt} is not simulated; use nf4")
    im = None
    if imatrix is not None and f.takes_imatrix:
        im = torch.as_tensor(imatrix, dtype=torch.float32, device=w.device)
    if w.device.type != "cpu" and _host_encodes(fmt):
        q = f.quantize(w.cpu(), None if im is None else im.cpu()).to(w.device)
        return f.dequantize(q).reshape(w.shape)
    return _round_trip(f, w, im)


def _round_trip(f: Any, w: Any, im: Any) -> Any:
    """``w`` through ``f`` and back on its own device. A device that runs out of memory (a whole tensor's search
    workspace beside a resident model) gets the rows in halves: rows are encoded independently, so the values are
    the same."""
    import torch

    try:
        return f.dequantize(f.quantize(w, im)).reshape(w.shape)
    except torch.OutOfMemoryError:
        if w.shape[0] < 2:
            raise
    torch.cuda.empty_cache()
    half = w.shape[0] // 2
    return torch.cat([_round_trip(f, w[:half], im), _round_trip(f, w[half:], im)])


def _host_encodes(fmt: str) -> bool:
    """Whether a GPU weight's ``fmt`` round trip is encoded by the host's C kernels (built and not switched off)."""
    import torch

    from ..kernels import _cpu_fast

    if fmt not in HOST_ENCODED:
        return False
    probe = torch.empty(0)
    return _cpu_fast.iq_enabled(probe) if fmt.startswith("iq") else _cpu_fast.enabled(probe)


def nf4_round_trip(weight: Any) -> Any:
    """bitsandbytes NF4 (registry block size over the flattened tensor, fp32 absmax) quantize + dequantize."""
    import torch

    from ..kernels import nf4

    packed, state = nf4.quantize_4bit(weight, "nf4")
    return nf4.dequantize_4bit(packed, state, torch.float32)


def nbytes(fmt: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` in ``fmt`` (nf4: packed codes + fp32 absmax per 64, no double quant)."""
    if fmt == "nf4":
        n = 1
        for d in shape:
            n *= d
        return n // 2 + 4 * -(-n // get_format("nf4").block_size)
    return get_format(fmt).nbytes(shape)
