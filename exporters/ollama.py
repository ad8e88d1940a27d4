"""Ollama ``Modelfile``: FROM the GGUF, ADAPTER when a LoRA GGUF rides on the base, the chat template translated to
Go (:mod:`.chat_template`), stop strings and the model's default sampling parameters.

The TEMPLATE reproduces the Hugging Face chat template's text for system / user / assistant conversations. A
leading BOS token text is left out when the GGUF's tokenizer adds BOS itself (``tokenizer.ggml.add_bos_token``),
as llama.cpp would otherwise see it twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UntranslatableTemplate
from ..model_source import ModelSource
from .chat_template import Translation, translate

#: generation_config.json keys -> Ollama PARAMETER names.
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "repetition_penalty": "repeat_penalty"}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_template_of(src: ModelSource) -> str | None:
    """The checkpoint's Jinja chat template (``chat_template.jinja``, else ``tokenizer_config.json``)."""
    jinja = src.side_file("chat_template.jinja")
    if jinja is not None:
        return jinja.read_text(encoding="utf-8")
    cfg = src.json_file("tokenizer_config.json") or {}
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None


def special_tokens(src: ModelSource) -> dict[str, str]:
    """``bos_token`` / ``eos_token`` / ... texts the chat template may use."""
    cfg = src.json_file("tokenizer_config.json") or {}
    side = src.json_file("special_tokens_map.json") or {}
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        text = _token_text(cfg.get(key)) or _token_text(side.get(key))
        if text is not None:
            out[key] = text
    return out


def gguf_adds_bos(gguf_path: str | os.PathLike[str]) -> bool:
    """Whether llama.cpp prepends BOS to every prompt for this GGUF."""
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False


def modelfile(src: ModelSource, model_file: str, adapter_file: str | None = None, add_bos: bool = False) -> str:
    """The Modelfile text for ``src`` (paths relative to the Modelfile's folder)."""
    lines = [f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    tokens = special_tokens(src)
    jinja = chat_template_of(src)
    stops: list[str] = []
    if jinja is not None:
        tr: Translation = translate(jinja, tokens, strip_bos=add_bos)
        if '"""' in tr.template:
            raise UntranslatableTemplate('the chat template contains """, which a Modelfile cannot quote')
        lines.append(f'TEMPLATE """{tr.template}"""')
        stops = tr.stops(tokens.get("eos_token"))
    elif tokens.get("eos_token"):
        stops = [tokens["eos_token"]]
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    gen = src.json_file("generation_config.json") or {}
    for key, name in SAMPLING.items():
        value = gen.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"PARAMETER {name} {value}")
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, src: ModelSource, model_file: str, adapter_file: str | None = None) -> Path:
    """Write ``folder/Modelfile`` next to ``model_file`` (and ``adapter_file``)."""
    path = folder / "Modelfile"
    path.write_text(modelfile(src, model_file, adapter_file, gguf_adds_bos(folder / model_file)), encoding="utf-8")
    return path
