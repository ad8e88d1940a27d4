"""Calibration text: plain text, JSONL with a text field, or chat/instruction JSONL rendered with the model's
chat template, tokenized and cut into fixed-length chunks the way llama.cpp's tools cut them.

Each source contributes an equal share of the chunks: first its calibration chunks (for the importance matrix),
then its held-out chunks (for the sensitivity measurements), taken from consecutive tokens of its own stream,
so the two sets never overlap.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, MissingFile

_TEXT_KEYS = ("text", "content")
_CHAT_KEYS = ("messages", "conversations")
_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
             "model": "assistant"}


@dataclass
class Chunks:
    """Token chunks of ``ctx`` tokens: ``calibration`` feeds the imatrix, ``holdout`` the sensitivity pass."""

    ctx: int
    calibration: list[list[int]] = field(default_factory=list)
    holdout: list[list[int]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a data file's bytes (part of the calibration cache key)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def render_record(record: dict[str, Any], tokenizer: Any, source: str) -> str:
    """One JSONL record as text: its text field, or its conversation rendered with the chat template."""
    for key in _TEXT_KEYS:
        if isinstance(record.get(key), str):
            return record[key]
    messages = None
    for key in _CHAT_KEYS:
        if isinstance(record.get(key), list):
            messages = [{"role": _ROLE_MAP.get(str(m.get("role", m.get("from", "user"))), "user"),
                         "content": str(m.get("content", m.get("value", "")))} for m in record[key]]
            break
    if messages is None and isinstance(record.get("instruction"), str):
        extra = record.get("input") or record.get("context") or ""
        prompt = record["instruction"] + (f"\n\n{extra}" if extra else "")
        answer = record.get("output") or record.get("response") or ""
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(answer)}]
    if messages is None:
        raise InputError(f"a JSONL record has none of the fields text, messages, conversations or instruction "
                         f"(keys: {sorted(record)[:6]})", path=source)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("chat/instruction records need the model's chat template, and the tokenizer has none; "
                         "give the data as plain text or a JSONL text field", path=source)
    return str(tokenizer.apply_chat_template(messages, tokenize=False))


def iter_documents(path: str | os.PathLike[str], tokenizer: Any) -> Iterator[str]:
    """Documents of one data file: the whole file for plain text, one per record for ``.jsonl``."""
    p = Path(path)
    if not p.is_file():
        raise MissingFile("calibration data file not found", path=p)
    if p.suffix.lower() in (".jsonl", ".json"):
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"line {n} is not valid JSON ({exc.msg})", path=p) from exc
                if not isinstance(record, dict):
                    raise InputError(f"line {n} is not a JSON object", path=p)
                yield render_record(record, tokenizer, str(p))
    else:
        yield p.read_text(encoding="utf-8", errors="replace")


def token_stream(path: str | os.PathLike[str], tokenizer: Any, max_tokens: int) -> list[int]:
    """Up to ``max_tokens`` tokens of a data file (documents joined by a blank line, no BOS/EOS added)."""
    out: list[int] = []
    for doc in iter_documents(path, tokenizer):
        text = doc if doc.endswith("\n") else doc + "\n\n"
        start = 0
        while start < len(text) and len(out) < max_tokens:
            # long plain-text files are tokenized in pieces cut at a line break, enough for the budget
            stop = len(text) if len(text) - start < 400_000 else text.rfind("\n", start, start + 400_000) + 1
            stop = stop if stop > start else len(text)
            out.extend(tokenizer(text[start:stop], add_special_tokens=False)["input_ids"])
            start = stop
        if len(out) >= max_tokens:
            break
    return out[:max_tokens]


def bos_to_replace(tokenizer: Any) -> int | None:
    """BOS id when the tokenizer adds one (llama.cpp then puts BOS at the start of every chunk), else ``None``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def split_counts(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers, the first ones larger."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def load_chunks(paths: list[str | os.PathLike[str]], tokenizer: Any, n_tokens: int, ctx: int,
                holdout_tokens: int) -> Chunks:
    """Calibration and held-out chunks of ``ctx`` tokens from ``paths`` (equal shares per file)."""
    if not paths:
        raise InputError("give at least one --data file")
    if ctx < 16:
        raise InputError(f"--ctx must be at least 16 tokens (llama.cpp ignores shorter batches), got {ctx}")
    n_cal = max(1, n_tokens // ctx)
    n_hold = holdout_tokens // ctx
    bos = bos_to_replace(tokenizer)
    out = Chunks(ctx=ctx, sources=[str(p) for p in paths])
    shares = zip(paths, split_counts(n_cal, len(paths)), split_counts(n_hold, len(paths)), strict=True)
    for path, k_cal, k_hold in shares:
        need = (k_cal + k_hold) * ctx
        toks = token_stream(path, tokenizer, need)
        if len(toks) < need:
            raise InputError(f"the file gives {len(toks)} tokens, its share needs {need} "
                             f"({k_cal} calibration + {k_hold} held-out chunks of {ctx}); lower --tokens, "
                             f"--holdout-tokens or --ctx, or add data", path=path)
        chunks = [toks[i * ctx:(i + 1) * ctx] for i in range(k_cal + k_hold)]
        if bos is not None:
            for c in chunks:
                c[0] = bos
        out.calibration.extend(chunks[:k_cal])
        out.holdout.extend(chunks[k_cal:])
    return out
