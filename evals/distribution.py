"""Plumbing for the distribution metrics: tokenize a text once, chunk it, run reference and model chunk by chunk.

The math lives in :mod:`.metrics`. Here engines produce logits: one ``[n_ctx, V]`` chunk at a time, scored in
blocks of rows, so no whole-text logits tensor ever exists. The reference's scored logits are kept (float32,
exact) up to ``cache_bytes``; chunks beyond the budget are recomputed for each model instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..errors import InputError
from . import metrics
from .engines import Engine

DEFAULT_CACHE_BYTES = 2 << 30
ROW_BLOCK = 16
"""Rows scored at a time: float64 [16, V] blocks stay in cache (64-row blocks took 1.4x as long on SmolLM2)."""


PREFIX_CHARS_PER_TOKEN = 16
"""With a chunk count, only a prefix of the text this many characters per needed token long is tokenized (English
BPE averages ~4); the chunks are checked to be those of the whole text's tokens (see :func:`prepare_chunks`)."""


def prepare_chunks(reference: Engine, text: str, n_ctx: int = 512, n_chunks: int | None = None) -> list[list[int]]:
    """Tokenize ``text`` with the reference tokenizer (special tokens as it adds them) and chunk it.

    With ``n_chunks`` only a prefix of the text is tokenized (the whole WikiText-2 test takes seconds, a few chunks
    a fraction of that). The prefix holds at least one more chunk's worth of tokens than needed, so the tokens
    used never touch the cut, where they could differ from the whole text's; if it is too short, the whole text
    is tokenized."""
    bos = reference.bos_id if reference.add_bos else None
    if n_chunks:
        need = (n_chunks + 1) * n_ctx
        cut = need * PREFIX_CHARS_PER_TOKEN
        if cut < len(text):
            tokens = reference.encode(text[:cut], add_special=True)
            if len(tokens) >= need:
                return metrics.make_chunks(tokens, n_ctx, n_chunks, bos)
    tokens = reference.encode(text, add_special=True)
    return metrics.make_chunks(tokens, n_ctx, n_chunks, bos)


def scored_logits(engine: Engine, chunk: Sequence[int]) -> Any:
    """Logits of the scored rows of one chunk (``[n_ctx//2 - 1, V]``, float32)."""
    rows = metrics.scored_rows(len(chunk))
    return engine.logits([chunk], [rows.start])[0][: rows.stop - rows.start]


class ReferenceLogits:
    """The reference model's scored logits per chunk, cached up to ``cache_bytes`` and recomputed beyond."""

    def __init__(self, engine: Engine, chunks: Sequence[Sequence[int]], cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.engine = engine
        self.chunks = chunks
        self.cache_bytes = cache_bytes
        self._cache: dict[int, Any] = {}
        self._held = 0

    def complete(self) -> bool:
        """Whether every chunk's logits are held (so they can be written to the on-disk cache)."""
        return len(self._cache) == len(self.chunks)

    def __getitem__(self, i: int) -> Any:
        if i in self._cache:
            return self._cache[i]
        logits = scored_logits(self.engine, self.chunks[i])
        size = logits.numel() * logits.element_size()
        if self._held + size <= self.cache_bytes:
            self._cache[i] = logits
            self._held += size
        return logits


def _blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def score(engine: Engine, chunks: Sequence[Sequence[int]], reference: ReferenceLogits | None = None,
          llamacpp_base: bool = False, on_chunk: Callable[[int, int], None] | None = None,
          reuse_reference: bool = False) -> dict[str, float]:
    """PPL of ``engine`` on ``chunks`` and, with a reference, KLD / top-1 / dp statistics against it.

    ``llamacpp_base`` passes the reference through llama-perplexity's 16-bit storage first (for bit-level
    comparisons with ``llama-perplexity --kl-divergence``). ``reuse_reference`` scores the reference's own
    logits instead of running ``engine`` again (for the reference row: one forward per chunk instead of two)."""
    if reuse_reference and (reference is None or reference.engine is not engine):
        raise InputError("reuse_reference needs the reference logits of the same engine")
    stats = metrics.DistributionStats()
    for i, chunk in enumerate(chunks):
        targets = metrics.scored_targets(chunk)
        base = reference[i] if reference is not None else None
        logits = base if reuse_reference else scored_logits(engine, chunk)
        for rows in _blocks(len(targets), ROW_BLOCK):
            if reuse_reference and not llamacpp_base:
                stats.add_self(logits[rows], targets[rows])
                continue
            base_lp = None
            if base is not None:
                block = base[rows]
                base_lp = (metrics.llamacpp_base_roundtrip(block).double() if llamacpp_base
                           else metrics.log_softmax(block))
            stats.add(logits[rows], targets[rows], base_lp)
        if on_chunk is not None:
            on_chunk(i + 1, len(chunks))
    return stats.summary()


PROBE_CHARS = 4000


def tokenizer_probe(engine: Engine, text: str, n_chars: int = PROBE_CHARS) -> list[int]:
    """The ids ``engine`` gives the start of ``text``: compared between reference and artifact (and cached with
    the reference's logits, so the check needs no reference model)."""
    return list(engine.encode(text[:n_chars], add_special=True))


def tokenizer_agrees(reference: Engine, engine: Engine, text: str, n_chars: int = PROBE_CHARS) -> bool:
    """Whether both tokenizers give the same ids for the start of ``text`` (the metrics feed reference ids)."""
    return tokenizer_probe(reference, text, n_chars) == tokenizer_probe(engine, text, n_chars)
