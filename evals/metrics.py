"""Distribution metrics of a model against a reference on the same tokens: pure math, no models, no I/O.

The conventions are llama-perplexity's (``shared/reference/GGUF.md`` §6), so numbers are comparable with
``llama-perplexity --kl-divergence``:

- the text is tokenized once; chunk ``i`` is tokens ``[i*n_ctx, (i+1)*n_ctx)``; when the tokenizer adds a BOS,
  the chunk's first token is *replaced* by BOS;
- only the second half of each chunk is scored: logits rows ``n_ctx//2 .. n_ctx-2`` predict tokens
  ``n_ctx//2+1 .. n_ctx-1`` (``n_ctx//2 - 1`` tokens per chunk);
- per scored token, ``KLD = sum_i p_i (log p_i - log q_i)`` over the vocabulary entries with
  ``log p_i > -16`` (p = reference, q = model), ``same_top = argmax q == argmax p`` (first index on ties) and
  ``dp = q(correct) - p(correct)``;
- ``PPL = exp(mean NLL)``; errors are ``sqrt((E[v^2] - E[v]^2) / (N - 1))``; percentiles interpolate linearly
  between sorted per-token values.

llama.cpp stores the reference log-probabilities as 16-bit codes, which adds about 5e-4 of KLD on its own;
:func:`llamacpp_base_roundtrip` reproduces that encoding when a bit-for-bit comparison with llama-perplexity is
wanted. By default the reference is used exactly, so a model against itself scores KLD 0.

Shapes: ``logits`` and log-probabilities are ``[n_tokens, n_vocab]``; ``targets`` is ``[n_tokens]``. Callers feed
one chunk (or a block of rows) at a time; nothing here needs a whole text's logits at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

LOG_PROB_FLOOR = -16.0
"""Reference log-probabilities at or below this do not enter the KLD sum (llama-perplexity's rule)."""


def make_chunks(tokens: Sequence[int], n_ctx: int, n_chunks: int | None = None,
                bos_id: int | None = None) -> list[list[int]]:
    """Split ``tokens`` into ``n_ctx``-token chunks, llama-perplexity style.

    ``n_chunks`` caps the count (``None`` or 0: every whole chunk). A trailing partial chunk is dropped. With
    ``bos_id`` (the tokenizer adds BOS), each chunk's first token is replaced by it.
    """
    if n_ctx < 4 or n_ctx % 2:
        raise InputError(f"context length must be an even number >= 4; got {n_ctx}")
    available = len(tokens) // n_ctx
    count = available if not n_chunks else min(available, n_chunks)
    if count < 1:
        raise InputError(f"the text has {len(tokens)} tokens, fewer than one {n_ctx}-token chunk; "
                         "use a longer text or a smaller --ctx")
    chunks = []
    for i in range(count):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        chunks.append(chunk)
    return chunks


def scored_rows(n_ctx: int) -> slice:
    """Rows of a chunk's logits that are scored: ``n_ctx//2 .. n_ctx-2`` (each predicts the next token)."""
    return slice(n_ctx // 2, n_ctx - 1)


def scored_targets(chunk: Sequence[int]) -> list[int]:
    """Tokens predicted by :func:`scored_rows` of ``chunk``: positions ``n_ctx//2+1 .. n_ctx-1``."""
    n_ctx = len(chunk)
    return list(chunk[n_ctx // 2 + 1:])


def log_softmax(logits: Any) -> Any:
    """Row-wise log-softmax in float64 (llama.cpp sums the exponentials in double)."""
    import torch

    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def token_nll(logprobs: Any, targets: Any) -> Any:
    """Negative log-likelihood of ``targets`` under ``logprobs`` (``[n, V]`` -> ``[n]`` float64)."""
    import torch

    t = torch.as_tensor(targets, dtype=torch.long, device=logprobs.device)
    return -logprobs.gather(-1, t[:, None])[:, 0].to(torch.float64)


def kl_divergence(base_logprobs: Any, logprobs: Any, floor: float = LOG_PROB_FLOOR) -> Any:
    """Per-row ``sum_i p_i (log p_i - log q_i)`` over entries with ``log p_i > floor`` (``[n, V]`` -> ``[n]``)."""
    import torch

    base = base_logprobs.to(torch.float64)
    terms = base.exp()
    terms.mul_(base - logprobs.to(torch.float64))  # in place: the same products, two fewer [n, V] buffers
    return terms.masked_fill_(torch.logical_not(base > floor), 0.0).sum(dim=-1)


def same_top(base_logprobs: Any, logprobs: Any) -> Any:
    """Per row, whether both argmaxes agree (first index on ties, as ``torch.argmax`` and llama.cpp do)."""
    return base_logprobs.argmax(dim=-1) == logprobs.argmax(dim=-1)


def llamacpp_base_roundtrip(logits: Any) -> Any:
    """Reference log-probabilities after llama-perplexity's 16-bit storage (``--kl-divergence-base`` file).

    Per row: ``max``/``min`` logits with ``min = max(min, max - 16)``, ``scale = (max - min) / 65535``, code
    ``round((logit - min) / scale)`` (0 at or below ``min``) and decoded ``scale * code + min - max - lse``.
    Computed in float32 like the C code.
    """
    import torch

    x = logits.to(torch.float32)
    mx = x.max(dim=-1, keepdim=True).values
    mn = torch.maximum(x.min(dim=-1, keepdim=True).values, mx - 16)
    lse = torch.log(torch.exp((x - mx).to(torch.float64)).sum(dim=-1, keepdim=True)).to(torch.float32)
    min_log_prob = mn - mx - lse
    scale = (mx - mn) / 65535.0
    codes = torch.where(x > mn, torch.round((x - mn) * (1.0 / scale)), torch.zeros_like(x))
    return scale * codes + min_log_prob


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linearly interpolated percentile of already sorted values (llama-perplexity's definition)."""
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    pos = fraction * (n - 1)
    lo = int(pos)
    frac = pos - lo
    hi = min(lo + 1, n - 1)
    return float((1 - frac) * sorted_values[lo] + frac * sorted_values[hi])


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error ``sqrt((E[v^2] - E[v]^2) / (N - 1))``."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, float("nan")
    mean2 = math.fsum(v * v for v in values) / n
    return mean, math.sqrt(max(mean2 - mean * mean, 0.0) / (n - 1))


def perplexity(nll: Sequence[float]) -> tuple[float, float]:
    """``exp(mean NLL)`` and llama-perplexity's ``PPL * sqrt((E[nll^2] - E[nll]^2) / (N - 1))``."""
    mean, err = mean_and_error(nll)
    ppl = math.exp(mean)
    return ppl, ppl * err


@dataclass
class DistributionStats:
    """Per-token values collected over the scored positions; :meth:`summary` turns them into metrics.

    Without a reference (``add`` called with ``base_logprobs=None``) only the perplexity is available.
    """

    nll: list[float] = field(default_factory=list)
    nll_base: list[float] = field(default_factory=list)
    kld: list[float] = field(default_factory=list)
    dp: list[float] = field(default_factory=list)
    n_same_top: int = 0

    def add(self, logits: Any, targets: Sequence[int], base_logprobs: Any | None = None) -> None:
        """Score one block of rows: ``logits`` ``[n, V]`` of the model, ``targets`` ``[n]``, reference
        log-probabilities ``[n, V]`` (already log-softmaxed, possibly through :func:`llamacpp_base_roundtrip`)."""
        logp = log_softmax(logits)
        nll = token_nll(logp, targets)
        self.nll.extend(nll.tolist())
        if base_logprobs is None:
            return
        if base_logprobs.shape != logp.shape:
            raise InputError(f"reference and model logits differ in shape: expected {tuple(base_logprobs.shape)}, "
                             f"got {tuple(logp.shape)}; the two must share a tokenizer and vocabulary")
        nll_base = token_nll(base_logprobs, targets)
        self.nll_base.extend(nll_base.tolist())
        self.kld.extend(kl_divergence(base_logprobs, logp).tolist())
        self.dp.extend(((-nll).exp() - (-nll_base).exp()).tolist())
        self.n_same_top += int(same_top(base_logprobs, logp).sum())

    def add_self(self, logits: Any, targets: Sequence[int]) -> None:
        """Score the reference against its own log-probabilities: what :meth:`add` records for ``logits`` and
        ``log_softmax(logits)`` (KLD and dp exactly 0, every top-1 the same) at a third of the work."""
        nll = token_nll(log_softmax(logits), targets).tolist()
        self.nll.extend(nll)
        self.nll_base.extend(nll)
        self.kld.extend([0.0] * len(nll))
        self.dp.extend([0.0] * len(nll))
        self.n_same_top += len(nll)

    def summary(self) -> dict[str, float]:
        """Metrics over every scored token: ``ppl`` (+ ``ppl_err``, ``n_tokens``) and, with a reference,
        ``ppl_base``, ``ln_ppl_ratio``, ``kld_mean`` (+ ``kld_err``), ``kld_median``, ``kld_p99``, ``kld_p999``,
        ``kld_max``, ``top1`` (+ ``top1_err``) and ``rms_dp``."""
        n = len(self.nll)
        if n == 0:
            raise InputError("no tokens were scored; the text needs at least one full chunk")
        ppl, ppl_err = perplexity(self.nll)
        out = {"n_tokens": n, "ppl": ppl, "ppl_err": ppl_err}
        if not self.kld:
            return out
        ppl_base, _ = perplexity(self.nll_base)
        diffs = [a - b for a, b in zip(self.nll, self.nll_base, strict=True)]
        ln_ratio, ln_ratio_err = mean_and_error(diffs)
        kld_mean, kld_err = mean_and_error(self.kld)
        ordered = sorted(self.kld)
        top1 = self.n_same_top / n
        rms_dp = math.sqrt(math.fsum(d * d for d in self.dp) / n)
        out.update({
            "ppl_base": ppl_base, "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_err": ln_ratio_err,
            "kld_mean": kld_mean, "kld_err": kld_err, "kld_median": percentile(ordered, 0.5),
            "kld_p99": percentile(ordered, 0.99), "kld_p999": percentile(ordered, 0.999), "kld_max": ordered[-1],
            "top1": top1, "top1_err": math.sqrt(top1 * (1 - top1) / (n - 1)) if n > 1 else float("nan"),
            "rms_dp": rms_dp,
        })
        return out
