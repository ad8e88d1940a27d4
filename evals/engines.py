"""Engines: a loaded artifact that turns token ids into logits, plus its tokenizer and greedy generation.

Every metric (:mod:`.distribution`) and every lm-eval request (:mod:`.lm_backends`) goes through the one primitive
:meth:`Engine.logits`, so the backends differ only in how the numbers are computed, never in request handling.

- :class:`HFEngine` runs a ``transformers`` model: a 16-bit checkpoint (``qf-hf``), a bitsandbytes 4-bit folder
  (``qf-bnb4``) or a GGUF whose weights our reader dequantized exactly (``qf-gguf``, ``engine=torch``).
- :class:`LlamaCppEngine` runs a GGUF file through llama-cpp-python (``qf-gguf``, ``engine=llama.cpp``).

Nothing is patched globally: each engine owns its model instance. Logits come back as float32 CPU tensors.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError, MissingFile, UnsupportedFormat

DTYPES = ("float32", "bfloat16", "float16", "auto")
DEFAULT_MAX_LENGTH = 2048


class Engine:
    """Common interface. Subclasses set the attributes below in ``__init__``."""

    kind: str = ""
    vocab_size: int = 0
    max_length: int = DEFAULT_MAX_LENGTH
    eos_id: int | None = None
    bos_id: int | None = None
    add_bos: bool = False
    batch_size: int = 1

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS only where the tokenizer itself does."""
        raise NotImplementedError

    def decode(self, tokens: Sequence[int]) -> str:
        raise NotImplementedError

    def logits(self, seqs: Sequence[Sequence[int]], starts: Sequence[int] | None = None,
               reuse: bool = False) -> list[Any]:
        """For each token sequence, the float32 logits of rows ``starts[i] .. len(seq)-1`` (``[rows, V]``).

        ``reuse`` lets a request skip its context (``seq[:start+1]``) when the previous request had the same one
        (much faster for multiple-choice tasks). Rows may then differ from one whole forward in the last bits,
        so the distribution metrics, which compare bit-identical runs, leave it off."""
        raise NotImplementedError

    def generate(self, tokens: Sequence[int], max_new_tokens: int, stop: Sequence[str]) -> str:
        """Greedy continuation of ``tokens``, cut before the first stop string."""
        raise NotImplementedError

    def sort_key(self, seq: Sequence[int]) -> Any:
        """Order in which batched requests run best (longest first, so padding stays small)."""
        return -len(seq)

    def close(self) -> None:
        """Release the model; the engine is unusable afterwards."""


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def _first_id(tokenizer: Any, attr: str) -> int | None:
    value = getattr(tokenizer, attr, None)
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


class HFEngine(Engine):
    """A ``transformers`` causal LM (any of: bf16/fp16 checkpoint, bnb4 folder, dequantized GGUF).

    With ``batch_size`` 1, sequences run one at a time and may reuse the context's KV cache (``reuse``), but
    only in float32: in bf16/fp16 (and bitsandbytes, whose single-row kernel differs from its matmul) splitting
    the forward moves a request's log-likelihood by up to 0.1 nats against one whole-sequence forward (lm-eval's
    ``HFLM``). With a larger batch they are right-padded and run together."""

    kind = "hf"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 1, max_length: int | None = None) -> None:
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = max(int(batch_size), 1)
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_id = _first_id(tokenizer, "eos_token_id")
        if self.eos_id is None:
            self.eos_id = _first_id(model.generation_config, "eos_token_id")
        self.bos_id = _first_id(tokenizer, "bos_token_id")
        probe = tokenizer.encode("a", add_special_tokens=True)
        self.add_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        self.max_length = int(max_length or _config_max_length(model.config, tokenizer))
        self._pad = self.eos_id if self.eos_id is not None else 0
        self._no_grad = torch.inference_mode
        self._prev: list[int] = []
        self._cache: Any = None
        self._last: Any = None
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        self.reuse_ok = bool(floats) and all(d == torch.float32 for d in floats)
        self._keeps_rows = "logits_to_keep" in inspect.signature(model.forward).parameters

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special))

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    def logits(self, seqs: Sequence[Sequence[int]], starts: Sequence[int] | None = None,
               reuse: bool = False) -> list[Any]:
        import torch

        starts = list(starts) if starts is not None else [0] * len(seqs)
        if self.batch_size == 1:
            return [self._one(list(s), st, reuse) for s, st in zip(seqs, starts, strict=True)]
        out: list[Any] = []
        for b in range(0, len(seqs), self.batch_size):
            batch = [list(s) for s in seqs[b:b + self.batch_size]]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, s in enumerate(batch):
                ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[i, :len(s)] = 1
            with self._no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    use_cache=False).logits  # [B, width, V], right-padded rows are ignored
            for i, s in enumerate(batch):
                out.append(logits[i, starts[b + i]:len(s)].to(device="cpu", dtype=torch.float32))
        return out

    def _one(self, seq: list[int], start: int, reuse: bool) -> Any:
        """One sequence. With ``reuse`` (float32 only) it runs as two forwards, the prefix ``seq[:start+1]`` and
        then the rest on its KV cache, and the prefix forward is skipped when the previous sequence had the same
        prefix: every request is computed the same way whatever ran before it."""
        import torch
        from transformers import DynamicCache

        split = start + 1
        if not (reuse and self.reuse_ok):
            ids = torch.tensor([seq], dtype=torch.long, device=self.device)
            keep = {"logits_to_keep": len(seq) - start} if self._keeps_rows and start > 0 else {}
            with self._no_grad():
                logits = self.model(input_ids=ids, use_cache=False, **keep).logits[0]  # [len - start, V]
            return logits[logits.shape[0] - (len(seq) - start):].to(device="cpu", dtype=torch.float32)
        if self._cache is None or self._prev != seq[:split]:
            self._cache = DynamicCache()
            ids = torch.tensor([seq[:split]], dtype=torch.long, device=self.device)
            with self._no_grad():
                last = self.model(input_ids=ids, past_key_values=self._cache, use_cache=True).logits[0, -1:]
            self._prev, self._last = seq[:split], last.to(device="cpu", dtype=torch.float32)
        elif self._cache.get_seq_length() > split:
            self._cache.crop(split - self._cache.get_seq_length())  # negative: tokens to drop (all versions)
        if split == len(seq):
            return self._last.clone()
        ids = torch.tensor([seq[split:]], dtype=torch.long, device=self.device)
        with self._no_grad():
            rest = self.model(input_ids=ids, past_key_values=self._cache, use_cache=True).logits[0]  # [len-split, V]
        return torch.cat([self._last, rest.to(device="cpu", dtype=torch.float32)])

    def sort_key(self, seq: Sequence[int]) -> Any:
        """Lexicographic one at a time (consecutive requests share prefixes), longest first when batching."""
        return tuple(seq) if self.batch_size == 1 else -len(seq)

    def generate(self, tokens: Sequence[int], max_new_tokens: int, stop: Sequence[str]) -> str:
        import torch

        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        stop_list = [s for s in stop if s]
        with self._no_grad():
            gen = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                temperature=None, top_p=None, top_k=None, pad_token_id=self._pad, eos_token_id=self.eos_id,
                stop_strings=stop_list or None, tokenizer=self.tokenizer if stop_list else None,
            )
        new = gen[0, ids.shape[1]:].tolist()
        if self.eos_id is not None and self.eos_id in new:
            new = new[:new.index(self.eos_id)]
        return cut_at_stop(self.decode(new), stop_list)

    def n_weights(self) -> int:
        """Logical weight count (bitsandbytes packs two 4-bit codes per stored element)."""
        total = 0
        for p in self.model.parameters():
            qs = getattr(p, "quant_state", None)
            if qs is not None and getattr(qs, "shape", None) is not None:
                n = 1
                for d in qs.shape:
                    n *= int(d)
                total += n
            else:
                total += p.numel()
        return total

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
        self._cache = None


def _config_max_length(config: Any, tokenizer: Any) -> int:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 10**9:
        return tml
    return DEFAULT_MAX_LENGTH


class LlamaCppEngine(Engine):
    """A GGUF run by llama.cpp through llama-cpp-python, with its own tokenizer.

    Requests are sorted lexicographically (:meth:`sort_key`) so that the choices of one question follow each
    other and share the evaluated context (see :meth:`logits`). Generation extends the context token by token.

    ``flash_attn`` defaults to on, as in llama.cpp's own tools (``llama-perplexity``, ``llama-cli``,
    ``llama-server``: ``--flash-attn auto``, which is on for the CPU backend), while llama-cpp-python defaults it
    off. Attention is then computed as those tools compute it: on SmolLM2 q4_k_m (2 x 512 tokens of WikiText-2,
    reference f16) our PPL / mean KLD / top-1 equal ``llama-perplexity --kl-divergence``'s printed values
    (22.570565 vs 22.570566, 0.0583788 vs 0.058379, 85.098% both); with it off they differ by 0.3% / 0.8% / 0.6 pt.
    """

    kind = "llama.cpp"

    def __init__(self, path: str | os.PathLike[str], n_ctx: int = DEFAULT_MAX_LENGTH, n_threads: int | None = None,
                 n_gpu_layers: int = 0, n_batch: int = 512, flash_attn: bool = True,
                 lora_path: str | os.PathLike[str] | None = None) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise InputError("engine=llama.cpp needs llama-cpp-python (pip install llama-cpp-python)") from exc
        self.path = str(path)
        threads = n_threads or max(1, min(os.cpu_count() or 1, 8))
        self.llm = llama_cpp.Llama(
            model_path=self.path, logits_all=True, n_ctx=int(n_ctx), n_batch=int(n_batch), n_ubatch=int(n_batch),
            n_threads=threads, n_threads_batch=threads, n_gpu_layers=int(n_gpu_layers), flash_attn=bool(flash_attn),
            lora_path=None if lora_path is None else str(lora_path), verbose=False,
        )
        self.vocab_size = int(self.llm.n_vocab())
        self.max_length = int(self.llm.n_ctx())
        self.eos_id = int(self.llm.token_eos())
        bos = int(self.llm.token_bos())
        self.bos_id = bos if bos >= 0 else None
        self._prefix: list[int] | None = None
        self._raw_batch: Any = None
        probe = self.llm.tokenize(b"a", add_bos=True, special=True)
        self.add_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def decode(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens), special=True).decode("utf-8", errors="replace")

    def sort_key(self, seq: Sequence[int]) -> Any:
        return tuple(seq)

    def _check_length(self, seq: Sequence[int]) -> None:
        if len(seq) > self.max_length:
            raise InputError(f"a request has {len(seq)} tokens, more than the llama.cpp context {self.max_length}; "
                             "pass a larger n_ctx model argument")

    def _holds(self, prefix: Sequence[int]) -> bool:
        llm = self.llm
        n = len(prefix)
        return llm.n_tokens >= n and all(int(a) == b for a, b in zip(llm.input_ids[:n], prefix, strict=True))

    def logits(self, seqs: Sequence[Sequence[int]], starts: Sequence[int] | None = None,
               reuse: bool = False) -> list[Any]:
        """Without ``reuse`` each sequence is evaluated afresh in one pass. With it, as two passes, the prefix
        ``seq[:start+1]`` and then the rest, the first skipped when the previous request's prefix pass was the
        same. Both
        keep each request's numbers independent of what ran before (llama.cpp's kernels depend on the batch
        shape: on q4_K a split at another point moves logits by up to ~1, so a plain longest-prefix reuse would
        score the choices of one question differently)."""
        import numpy as np
        import torch

        starts = list(starts) if starts is not None else [0] * len(seqs)
        llm = self.llm
        out = []
        for seq, start in zip(seqs, starts, strict=True):
            seq = [int(t) for t in seq]
            self._check_length(seq)
            split = start + 1
            if reuse:
                if self._prefix == seq[:split] and self._holds(seq[:split]):
                    llm.n_tokens = split
                else:
                    llm.n_tokens = 0
                    llm.eval(seq[:split])
                    self._prefix = seq[:split]
                if split < len(seq):
                    llm.eval(seq[split:])
            else:
                out.append(torch.from_numpy(self._fresh(seq, start)))
                self._prefix = None
                continue
            out.append(torch.from_numpy(np.array(llm.scores[start:len(seq)], dtype=np.float32)))
        return out

    def _fresh(self, seq: list[int], start: int) -> Any:
        """Rows ``start ..`` of ``seq``'s logits from one pass over an empty cache, llama.cpp computing the output
        layer for those rows only (as ``llama-perplexity`` asks for the scored half of a chunk): ``[rows, V]``
        float32. Each row's numbers equal a pass with every row's logits; the saving is the output matmul and
        the copy of the unwanted rows."""
        import llama_cpp
        import numpy as np

        llm = self.llm
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), -1, 0, -1)
        llm.n_tokens = 0
        batch = self._batch()
        rows = []
        for b in range(0, len(seq), llm.n_batch):
            piece = seq[b:b + llm.n_batch]
            batch.n_tokens = len(piece)
            for i, tok in enumerate(piece):
                batch.token[i] = tok
                batch.pos[i] = b + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = b + i >= start
            if llama_cpp.llama_decode(llm.ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed on a {len(piece)}-token batch")
            llm.input_ids[b:b + len(piece)] = piece
            llm.n_tokens = b + len(piece)
            n_out = len(piece) - max(0, min(start - b, len(piece)))
            if n_out:
                view = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_out, self.vocab_size))
                rows.append(view.copy())
        if not rows:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def _batch(self) -> Any:
        """A ``llama_batch`` of ``n_batch`` tokens, made on first use and freed by :meth:`close`."""
        import llama_cpp

        if self._raw_batch is None:
            self._raw_batch = llama_cpp.llama_batch_init(self.llm.n_batch, 0, 1)
        return self._raw_batch

    def generate(self, tokens: Sequence[int], max_new_tokens: int, stop: Sequence[str]) -> str:
        import numpy as np

        seq = [int(t) for t in tokens]
        new: list[int] = []
        stop_list = [s for s in stop if s]
        for _ in range(max_new_tokens):
            if len(seq) >= self.max_length:
                break
            self._check_length(seq)
            self._prefix = None
            if len(seq) > 1 and self._holds(seq[:-1]):
                self.llm.n_tokens = len(seq) - 1
                self.llm.eval(seq[-1:])
            else:
                self.llm.n_tokens = 0
                self.llm.eval(seq)
            nxt = int(np.argmax(self.llm.scores[len(seq) - 1]))
            if nxt == self.eos_id:
                break
            seq.append(nxt)
            new.append(nxt)
            text = self.decode(new)
            if any(s in text for s in stop_list):
                break
        return cut_at_stop(self.decode(new), stop_list)

    def close(self) -> None:
        if self._raw_batch is not None:
            import llama_cpp

            llama_cpp.llama_batch_free(self._raw_batch)
            self._raw_batch = None
        if self.llm is not None:
            self.llm.close()
        self.llm = None


def resolve_dtype(name: str | None, device: str) -> Any:
    """``torch`` dtype for a ``dtype`` model argument; the default is float32 (exact reference numbers)."""
    import torch

    name = name or "float32"
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    if name == "auto":
        return "auto"
    return getattr(torch, name)


def load_hf(path: str | os.PathLike[str], dtype: str | None = None, device: str = "cpu", batch_size: int = 1,
            max_length: int | None = None, tokenizer: str | None = None) -> HFEngine:
    """A 16-bit (or any plain) ``transformers`` checkpoint folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = _require_dir(path)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=resolve_dtype(dtype, device), device_map=device)
    tok = AutoTokenizer.from_pretrained(tokenizer or p)
    return HFEngine(model, tok, batch_size=batch_size, max_length=max_length)


def load_bnb4(path: str | os.PathLike[str], dtype: str | None = None, device: str = "cpu", batch_size: int = 1,
              max_length: int | None = None, tokenizer: str | None = None) -> HFEngine:
    """A bitsandbytes 4-bit folder (``quantization_config.load_in_4bit``), loaded as saved."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = _require_dir(path)
    qcfg = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
    if not qcfg.get("load_in_4bit"):
        raise UnsupportedFormat("expected a bitsandbytes 4-bit folder (config.json quantization_config.load_in_4bit)"
                                "; use qf-hf for plain checkpoints", path=p)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise InputError("qf-bnb4 needs bitsandbytes (pip install 'quantforge[bnb]')") from exc
    kwargs: dict[str, Any] = {"device_map": device}
    if dtype:
        kwargs["dtype"] = resolve_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(p, **kwargs)
    tok = AutoTokenizer.from_pretrained(tokenizer or p)
    return HFEngine(model, tok, batch_size=batch_size, max_length=max_length)


def load_gguf_torch(path: str | os.PathLike[str], dtype: str | None = None, device: str = "cpu", batch_size: int = 1,
                    max_length: int | None = None, tokenizer: str | None = None) -> HFEngine:
    """A GGUF dequantized exactly by our reader and run as a ``transformers`` model (fast on GPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = _require_gguf(path)
    from ..gguf_reader import load_hf_state_dict

    config_dict, state = load_hf_state_dict(p, dtype=torch.float32, device="cpu")
    cfg = dict(config_dict)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch_dtype = resolve_dtype(dtype, device)
    if torch_dtype == "auto":
        torch_dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise UnsupportedFormat(f"GGUF weights do not fit the rebuilt {model_type} model: missing "
                                f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}", path=p)
    if tied:
        model.tie_weights()
    model = model.to(device)
    if tokenizer:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    engine = HFEngine(model, tok, batch_size=batch_size, max_length=max_length)
    engine.kind = "torch"
    return engine


def load_gguf_llamacpp(path: str | os.PathLike[str], n_ctx: int = DEFAULT_MAX_LENGTH, n_threads: int | None = None,
                       device: str = "cpu", flash_attn: bool = True, lora_path: str | None = None,
                       **_: Any) -> LlamaCppEngine:
    """A GGUF run by llama.cpp (all layers offloaded when ``device`` is a GPU), with a LoRA GGUF adapter applied
    when ``lora_path`` names one."""
    p = _require_gguf(path)
    return LlamaCppEngine(p, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=0 if device == "cpu" else -1,
                          flash_attn=flash_attn, lora_path=lora_path)


def _require_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise MissingFile("expected a checkpoint folder (config.json + safetensors)", path=p)
    if not (p / "config.json").is_file():
        raise MissingFile("config.json is missing from the checkpoint folder", path=p)
    return p


def _require_gguf(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise MissingFile("expected a .gguf file", path=p)
    return p


GGUF_ENGINES = ("llama.cpp", "torch")


def open_engine(path: str | os.PathLike[str], engine: str | None = None, **opts: Any) -> Engine:
    """Open any artifact: a ``.gguf`` (``engine`` llama.cpp (default) or torch), a bnb4 folder or a checkpoint."""
    p = Path(path)
    kind = artifact_kind(p)
    if kind == "gguf":
        engine = engine or "llama.cpp"
        if engine not in GGUF_ENGINES:
            raise InputError(f"unknown GGUF engine {engine!r}; expected one of {', '.join(GGUF_ENGINES)}")
        if engine == "torch":
            return load_gguf_torch(p, **_only(opts, "dtype", "device", "batch_size", "max_length", "tokenizer"))
        return load_gguf_llamacpp(p, **_only(opts, "n_ctx", "n_threads", "device", "flash_attn", "lora_path"))
    if engine not in (None, "torch"):
        raise InputError(f"engine={engine} applies to .gguf files only; {p} is a {kind} folder")
    loader = load_bnb4 if kind == "bnb4" else load_hf
    return loader(p, **_only(opts, "dtype", "device", "batch_size", "max_length", "tokenizer"))


def _only(opts: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in opts.items() if k in keys and v is not None}


def artifact_kind(path: str | os.PathLike[str]) -> str:
    """``gguf``, ``bnb4`` or ``checkpoint`` from the path alone (file suffix, ``config.json``)."""
    import json

    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.is_dir() and (p / "config.json").is_file():
        qcfg = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
        return "bnb4" if qcfg.get("load_in_4bit") else "checkpoint"
    if not p.exists():
        raise MissingFile("no such artifact", path=p)
    raise UnsupportedFormat("expected a .gguf file or a checkpoint folder with config.json", path=p)
