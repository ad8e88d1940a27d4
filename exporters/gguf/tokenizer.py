"""Tokenizer metadata for GGUF: vocabulary, scores, token types, merges, pre-tokenizer name, special ids,
add_bos/add_eos and the chat template.

BPE tokenizers (``tokenizer.json`` with a BPE model) become ``tokenizer.ggml.model = gpt2``; SentencePiece
(``tokenizer.model``) becomes ``llama``. Special ids, flags and the chat template come from the ``gguf``
package's :class:`gguf.SpecialVocab`, the same reader llama.cpp's converter uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import CorruptCheckpoint, MissingFile, UnsupportedArch

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns of known BPE families -> the name llama.cpp knows them by.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PATTERNS = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}


@dataclass
class Vocab:
    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    add_space_prefix: bool | None = None


def load_vocab(path: Path, n_vocab: int) -> Vocab:
    """Read the tokenizer in checkpoint folder ``path``; pad to ``n_vocab`` (embedding rows) with unused tokens."""
    tj = path / "tokenizer.json"
    spm = path / "tokenizer.model"
    if tj.is_file():
        data = _read_json(tj)
        if data.get("model", {}).get("type") == "BPE" and not data["model"].get("byte_fallback"):
            return _bpe_vocab(data, n_vocab)
    if spm.is_file():
        return _spm_vocab(spm, path, n_vocab)
    if tj.is_file():
        raise UnsupportedArch("tokenizer.json is not a byte-level BPE tokenizer and there is no tokenizer.model",
                              path=tj)
    raise MissingFile("no tokenizer (tokenizer.json or tokenizer.model) in the checkpoint folder", path=path)


def _read_json(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorruptCheckpoint(f"not valid JSON ({exc})", path=p) from exc


def bpe_pre_name(data: dict[str, Any]) -> str:
    """Name of llama.cpp's pre-tokenizer matching this tokenizer.json's pre_tokenizer section."""
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split":
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        if pattern in _SPLIT_PATTERNS:
            return _SPLIT_PATTERNS[pattern]
    raise UnsupportedArch(f"unrecognised BPE pre-tokenizer {json.dumps(pre)[:120]}; llama.cpp would tokenize it "
                          "differently, so quantforge refuses rather than write a file that degrades silently")


def _bpe_vocab(data: dict[str, Any], n_vocab: int) -> Vocab:
    model = data["model"]
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in data.get("added_tokens", []):
        tid = int(added["id"])
        by_id[tid] = added["content"]
        types[tid] = CONTROL if added.get("special") or _looks_control(added["content"]) else USER_DEFINED
    size = max(n_vocab, max(by_id) + 1)
    tokens, ttypes = [], []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            ttypes.append(types.get(i, NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            ttypes.append(UNUSED)
    return Vocab("gpt2", bpe_pre_name(data), tokens, ttypes, merges=_merge_lines(model["merges"]))


def _merge_lines(merges: list[Any]) -> list[str]:
    """HF merges (``"a b"`` strings, or ``[a, b]`` pairs in newer files) as GGUF merge lines ``"a b"``; a space
    inside a pair's part becomes ``\u0120`` (GPT-2's byte-level space), as llama.cpp's converter writes it."""
    if all(isinstance(m, str) for m in merges):
        return list(merges)
    if all(isinstance(m, list) and len(m) == 2 and " " not in m[0] and " " not in m[1] for m in merges):
        return [f"{a} {b}" for a, b in merges]  # the common case, without a per-part replace
    return [m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m) for m in merges]


def _looks_control(text: str) -> bool:
    return text.startswith("<|") and text.endswith("|>")


def _spm_vocab(spm_path: Path, folder: Path, n_vocab: int) -> Vocab:
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(spm_path))
    except Exception as exc:
        raise CorruptCheckpoint(f"cannot read SentencePiece model ({exc})", path=spm_path) from exc
    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            types.append(UNKNOWN)
        elif sp.IsControl(i):
            types.append(CONTROL)
        elif sp.IsUnused(i):
            types.append(UNUSED)
        elif sp.IsByte(i):
            types.append(BYTE)
        elif proto.pieces[i].type == pb.ModelProto.SentencePiece.USER_DEFINED:
            types.append(USER_DEFINED)  # matched whole before any merge, as SentencePiece does (Gemma's turn markers)
        else:
            types.append(NORMAL)
    for tid, added in sorted(_added_tokens(folder).items()):
        if tid < len(types) and types[tid] in (UNKNOWN, CONTROL, BYTE):
            continue
        while len(tokens) <= tid:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(UNUSED)
        special = added.get("special") or _looks_control(added["content"])
        tokens[tid] = added["content"] if special else added["content"].replace("\u2581", " ")
        scores[tid] = -1000.0
        types[tid] = CONTROL if special else USER_DEFINED
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    return Vocab("llama", "default", tokens, types, scores=scores, add_space_prefix=bool(
        proto.normalizer_spec.add_dummy_prefix))


def _added_tokens(folder: Path) -> dict[int, dict[str, Any]]:
    """Tokens the HF tokenizer adds on top of (or re-labels inside) the SentencePiece vocabulary, by id:
    ``tokenizer.json``'s ``added_tokens`` and ``tokenizer_config.json``'s ``added_tokens_decoder`` (the latter wins,
    as in llama.cpp's converter); special ones become CONTROL tokens, the others USER_DEFINED."""
    out: dict[int, dict[str, Any]] = {}
    tj, tc = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if tj.is_file():
        out.update({int(a["id"]): a for a in _read_json(tj).get("added_tokens", [])})
    if tc.is_file():
        out.update({int(i): a for i, a in (_read_json(tc).get("added_tokens_decoder") or {}).items()})
    return out


def write_tokenizer(writer: Any, path: Path, n_vocab: int) -> Vocab:
    """Write every ``tokenizer.*`` key for the tokenizer in ``path``."""
    import gguf

    vocab = load_vocab(path, n_vocab)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    special = gguf.SpecialVocab(path, load_merges=False, n_vocab=len(vocab.tokens))
    if vocab.model == "gpt2":
        writer.add_token_merges(vocab.merges)
        for key in ("bos", "eos"):
            if special.special_token_ids.get(key) is None:
                special.special_token_ids[key] = 11
    if special.add_special_token.get("bos") is None:
        special.add_special_token["bos"] = vocab.model == "llama" or vocab.pre == "llama-bpe"
    special.add_to_gguf(writer, quiet=True)
    return vocab
