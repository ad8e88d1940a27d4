"""lm-eval model backends over our engines: ``qf-hf``, ``qf-bnb4`` and ``qf-gguf`` (``engine=llama.cpp|torch``).

Registration is explicit: :func:`register` adds the three names to lm-eval's model registry (idempotent).
Importing this module registers nothing. From lm-eval's own command line, use the wrapper that registers first::

    python -m quantforge.evals.lm_eval_main run --model qf-gguf \
        --model_args path=model.q4_k_m.gguf,engine=torch --tasks qf_arc_easy \
        --include_path $(python -c "from quantforge.evals.lm_eval_runner import TASKS_DIR; print(TASKS_DIR)")

Every backend shares :class:`QFLM`'s request handling (lm-eval's ``TemplateLM`` tokenization, the same rolling
windows as ``HFLM``), so they differ only in how an engine computes logits. Log-probabilities are taken in
float64 from float32 logits. Generation is greedy.
"""

from __future__ import annotations

import warnings
from typing import Any

from lm_eval.api.model import TemplateLM

from ..errors import InputError
from .engines import Engine, open_engine

BACKENDS = ("qf-hf", "qf-bnb4", "qf-gguf")


class QFLM(TemplateLM):
    """An lm-eval ``LM`` around an :class:`~quantforge.evals.engines.Engine`.

    ``loglikelihood``: ``(context + continuation)`` truncated on the left to ``max_length + 1`` tokens, the last
    dropped, continuation rows scored (as ``HFLM`` does). ``loglikelihood_rolling``: lm-eval's disjoint rolling
    windows with ``prefix_token_id`` first. ``generate_until``: greedy, stopped at ``until`` or EOS.
    """

    def __init__(self, engine: Engine, max_gen_toks: int = 256) -> None:
        super().__init__()
        self.engine = engine
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        if self.engine.eos_id is None:
            raise InputError("the tokenizer has no EOS token; lm-eval needs one")
        return self.engine.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.engine.bos_id if self.engine.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    @property
    def tokenizer_name(self) -> str:
        return type(self.engine).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Tokens of ``string``; by default special tokens are added as the tokenizer does, unless ``string``
        already starts with the BOS text."""
        if add_special_tokens is None:
            bos_text = self.engine.decode([self.engine.bos_id]) if self.engine.bos_id is not None else None
            add_special_tokens = not (bos_text and string.startswith(bos_text))
        enc = self.engine.encode(string, add_special=add_special_tokens)
        return enc[-left_truncate_len:] if left_truncate_len else enc

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        import torch

        seqs, starts = [], []
        for _, ctx, cont in requests:
            if not cont:
                raise InputError("an lm-eval request has an empty continuation")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            inp = whole[:-1]
            seqs.append(inp)
            starts.append(len(inp) - len(cont))
        order = sorted(range(len(seqs)), key=lambda i: self.engine.sort_key(seqs[i]))
        results: list[tuple[float, bool] | None] = [None] * len(seqs)
        step = max(self.engine.batch_size, 1)
        for b in range(0, len(order), step):
            idx = order[b:b + step]
            rows = self.engine.logits([seqs[i] for i in idx], [starts[i] for i in idx], reuse=True)
            for i, logits in zip(idx, rows, strict=True):
                cont = torch.tensor(requests[i][2], dtype=torch.long)
                logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
                total = float(logp.gather(-1, cont[:, None]).sum())
                greedy = bool((logp.argmax(dim=-1) == cont).all())
                results[i] = (total, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return [r for r in results if r is not None]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for req in requests:
            (string,) = req.args
            windows = [
                utils.make_disjoint_window(w)
                for w in utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                )
            ]
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            total = sum(ll for ll, _ in scored)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences

        eos_text = self.engine.decode([self.eot_token_id])
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                warnings.warn("quantforge backends decode greedily; sampling arguments are ignored", stacklevel=2)
            until = handle_stop_sequences(kwargs.get("until"), eos=eos_text)
            max_new = int(kwargs.get("max_gen_toks") or kwargs.get("max_new_tokens") or self.max_gen_toks)
            ctx = self.tok_encode(context, left_truncate_len=max(self.max_length - max_new, 1))
            text = self.engine.generate(ctx, max_new, until)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def close(self) -> None:
        self.engine.close()


def _engine_opts(batch_size: Any, max_length: Any, **rest: Any) -> dict[str, Any]:
    opts = {k: v for k, v in rest.items() if v is not None}
    if batch_size not in (None, "auto") and not str(batch_size).startswith("auto"):
        opts["batch_size"] = int(batch_size)
    if max_length is not None:
        opts["max_length"] = int(max_length)
    return opts


def _flag(value: Any) -> bool:
    """A boolean model argument (lm-eval passes ``key=false`` as a string or a bool)."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise InputError(f"expected true or false for a boolean model argument; got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


class QFHF(QFLM):
    """``qf-hf``: a 16-bit HF checkpoint folder. Model args: ``path`` (or ``pretrained``), ``dtype``
    (float32 default, bfloat16, float16, auto), ``device``, ``batch_size``, ``max_length``, ``tokenizer``."""

    def __init__(self, path: str | None = None, pretrained: str | None = None, dtype: str | None = None,
                 device: str | None = None, batch_size: Any = 1, max_length: Any = None, tokenizer: str | None = None,
                 max_gen_toks: int = 256, **_: Any) -> None:
        from .engines import load_hf

        target = path or pretrained
        if not target:
            raise InputError("qf-hf needs a path=... model argument")
        opts = _engine_opts(batch_size, max_length, dtype=dtype, device=device or "cpu", tokenizer=tokenizer)
        super().__init__(load_hf(target, **opts), max_gen_toks=max_gen_toks)


class QFBnb4(QFLM):
    """``qf-bnb4``: a bitsandbytes 4-bit folder loaded as saved. Model args as ``qf-hf`` (``dtype`` optional)."""

    def __init__(self, path: str | None = None, pretrained: str | None = None, dtype: str | None = None,
                 device: str | None = None, batch_size: Any = 1, max_length: Any = None, tokenizer: str | None = None,
                 max_gen_toks: int = 256, **_: Any) -> None:
        from .engines import load_bnb4

        target = path or pretrained
        if not target:
            raise InputError("qf-bnb4 needs a path=... model argument")
        opts = _engine_opts(batch_size, max_length, dtype=dtype, device=device or "cpu", tokenizer=tokenizer)
        super().__init__(load_bnb4(target, **opts), max_gen_toks=max_gen_toks)


class QFGGUF(QFLM):
    """``qf-gguf``: a GGUF file. Model args: ``path``, ``engine`` (``llama.cpp`` default, or ``torch`` for our
    exact dequantization run as an HF model), ``n_ctx``, ``n_threads`` and ``flash_attn`` (llama.cpp; on by
    default, as in llama.cpp's tools), ``dtype``, ``batch_size`` and ``tokenizer`` (torch), ``device``."""

    def __init__(self, path: str | None = None, pretrained: str | None = None, engine: str = "llama.cpp",
                 n_ctx: Any = 2048, n_threads: Any = None, dtype: str | None = None, device: str | None = None,
                 batch_size: Any = 1, max_length: Any = None, tokenizer: str | None = None, max_gen_toks: int = 256,
                 flash_attn: Any = True, **_: Any) -> None:
        target = path or pretrained
        if not target:
            raise InputError("qf-gguf needs a path=... model argument")
        if not str(target).endswith(".gguf"):
            raise InputError(f"qf-gguf expects a .gguf file; got {target}")
        opts = _engine_opts(batch_size, max_length, dtype=dtype, device=device or "cpu", tokenizer=tokenizer,
                            n_ctx=int(n_ctx), n_threads=int(n_threads) if n_threads else None,
                            flash_attn=_flag(flash_attn))
        super().__init__(open_engine(target, engine=engine, **opts), max_gen_toks=max_gen_toks)


def register() -> None:
    """Add ``qf-hf``, ``qf-bnb4`` and ``qf-gguf`` to lm-eval's model registry (safe to call more than once)."""
    from lm_eval.api.registry import register_model

    for name, cls in zip(BACKENDS, (QFHF, QFBnb4, QFGGUF), strict=True):
        register_model(name)(cls)


def from_engine(engine: Engine, max_gen_toks: int = 256) -> QFLM:
    """An lm-eval ``LM`` around an engine that is already open (what ``quantforge eval`` uses)."""
    return QFLM(engine, max_gen_toks=max_gen_toks)
