"""Training data: read records with ``datasets``, render them with the model's chat template, tokenize, and mark
which tokens carry loss.

Three record shapes, recognised by their columns:

* chat: ``messages`` = ``[{"role": ..., "content": ...}, ...]``; loss on every assistant turn;
* instruction: ``instruction`` (+ optional ``input`` / ``context``) and ``output`` (or ``response``), rendered as a
  user turn then an assistant turn; loss on the response;
* raw text: ``text``; loss on every token (BOS/EOS added as the tokenizer does, EOS appended).

An assistant turn's loss covers its content and the template's end-of-turn text (so the model learns to stop),
never the role header: the header is what ``add_generation_prompt=True`` renders after the preceding turns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, MissingFile

IGNORE = -100
_INSTRUCTION = ("instruction", "prompt", "question")
_INPUT = ("input", "context")
_RESPONSE = ("output", "response", "answer")


@dataclass
class Example:
    """One tokenized example: ``ids`` and per-token ``loss_mask`` (1 = this token is a training target)."""

    ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        """How many of :meth:`labels` carry loss (what a packed batch of this example counts as targets)."""
        return sum(self.loss_mask[1:])

    def labels(self) -> list[int]:
        """Next-token labels: ``labels[i] = ids[i+1]`` where token ``i+1`` carries loss, else -100 (the last
        position has no next token)."""
        out = [tok if m else IGNORE for tok, m in zip(self.ids[1:], self.loss_mask[1:], strict=True)]
        return out + [IGNORE]


def load_records(data: Any) -> Any:
    """A ``datasets.Dataset`` from a JSONL/JSON file, a Parquet file, a folder saved by ``save_to_disk``, or an
    existing ``Dataset`` (returned as is)."""
    import datasets

    if isinstance(data, datasets.Dataset):
        return data
    if isinstance(data, datasets.DatasetDict):
        return _train_split(data, "the dataset")
    path = Path(os.fspath(data))
    if not path.exists():
        raise MissingFile("data file or folder not found", path=path)
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            return _train_split(loaded, str(path)) if isinstance(loaded, datasets.DatasetDict) else loaded
        suffix = path.suffix.lower()
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
        if kind is None:
            raise InputError(f"cannot read {suffix or 'extension-less'} data; expected .jsonl, .json, .parquet or a "
                             "folder saved with datasets' save_to_disk", path=path)
        return _quiet_load(datasets, kind, path)
    except InputError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"could not read the data ({type(exc).__name__}: {msg})", path=path) from exc


def _quiet_load(datasets: Any, kind: str, path: Path) -> Any:
    """``load_dataset`` without its own progress bars (the caller draws progress)."""
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    finally:
        if was:
            datasets.enable_progress_bars()


def _train_split(dd: Any, where: str) -> Any:
    if "train" in dd:
        return dd["train"]
    if len(dd) == 1:
        return next(iter(dd.values()))
    raise InputError(f"{where} has splits {sorted(dd)} and none is named 'train'")


def detect_shape(columns: list[str]) -> str:
    """``chat``, ``instruction`` or ``text`` from the column names; anything else is an :class:`InputError`."""
    cols = set(columns)
    if "messages" in cols:
        return "chat"
    if cols & set(_INSTRUCTION) and cols & set(_RESPONSE):
        return "instruction"
    if "text" in cols:
        return "text"
    raise InputError(f"cannot read the column layout {sorted(cols)}: expected 'messages' (chat), "
                     "'instruction' + 'output' (with optional 'input'), or 'text'")


def _pick(rec: dict[str, Any], keys: tuple[str, ...]) -> str:
    for k in keys:
        v = rec.get(k)
        if v is not None:
            return str(v)
    return ""


def to_messages(rec: dict[str, Any], shape: str) -> list[dict[str, str]] | None:
    """The conversation of a chat or instruction record (``None`` when it has no assistant content)."""
    if shape == "chat":
        msgs = rec.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return None
        clean = [{"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in msgs
                 if isinstance(m, dict)]
        return clean if any(m["role"] == "assistant" and m["content"] for m in clean) else None
    instruction, extra, response = _pick(rec, _INSTRUCTION), _pick(rec, _INPUT), _pick(rec, _RESPONSE)
    if not instruction.strip() or not response.strip():
        return None
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


def response_spans(tok: Any, msgs: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (content + end of turn)."""
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else None
        upto = tok.apply_chat_template(msgs[:i + 1], tokenize=False)
        if head is None:
            start = upto.find(m["content"])
        elif upto.startswith(head):
            start = len(head)
        else:
            raise InputError("the chat template does not render a conversation as the sum of its turns; "
                             "cannot tell which tokens are the assistant's")
        spans.append((start, len(upto)))
    return tok.apply_chat_template(msgs, tokenize=False), spans


def _token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    return [int(b > a and any(s <= a < e for s, e in spans)) for a, b in offsets]


def tokenize_record(tok: Any, rec: dict[str, Any], shape: str) -> Example | None:
    """One record -> :class:`Example` (``None`` when it holds nothing to learn)."""
    if shape == "text":
        text = rec.get("text")
        if not isinstance(text, str) or not text.strip():
            return None
        ids = tok(text, add_special_tokens=True)["input_ids"]
        if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
            ids = ids + [tok.eos_token_id]
        return Example(ids, [1] * len(ids))
    msgs = to_messages(rec, shape)
    if msgs is None:
        return None
    text, spans = response_spans(tok, msgs)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = _token_mask(enc["offset_mapping"], spans)
    if not any(mask[1:]):
        return None
    return Example(list(enc["input_ids"]), mask)


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise MissingFile(f"could not load the tokenizer ({type(exc).__name__})", path=path) from exc


def build_examples(data: Any, tokenizer: Any, max_seq_len: int, progress: Any = None) -> tuple[list[Example], dict]:
    """Tokenize every usable record; drop those longer than ``max_seq_len``. Returns the examples and counts
    (``records``, ``unusable``, ``too_long``, ``shape``, ``shortest``)."""
    ds = load_records(data)
    shape = detect_shape(list(ds.column_names))
    if shape != "text" and not getattr(tokenizer, "chat_template", None):
        raise InputError(f"the tokenizer has no chat template, which {shape} data needs; use a model with a "
                         "chat template or 'text' records")
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("the trainer needs a fast (tokenizer.json) tokenizer for loss masking")
    examples, unusable, too_long, shortest = [], 0, 0, None
    rows = iter(ds)
    for rec in progress(rows, total=len(ds), desc="tokenize", unit="ex") if progress else rows:
        ex = tokenize_record(tokenizer, rec, shape)
        if ex is None or len(ex) < 2:
            unusable += 1
            continue
        shortest = len(ex) if shortest is None else min(shortest, len(ex))
        if len(ex) > max_seq_len:
            too_long += 1
            continue
        examples.append(ex)
    stats = {"records": len(ds), "unusable": unusable, "too_long": too_long, "shape": shape, "shortest": shortest}
    if not examples:
        if shortest is None:
            raise InputError(f"the data has no usable examples ({len(ds)} records, none with {shape} content)")
        raise InputError(f"--max-seq-len {max_seq_len} is below the shortest example ({shortest} tokens); "
                         f"raise --max-seq-len")
    return examples, stats
