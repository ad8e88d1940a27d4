"""Helpers shared by the tests and benchmarks: llama.cpp (through llama-cpp-python) and Hugging Face reference
runs, logit comparisons, and tiny random checkpoints. Importable as ``helpers.reference`` because the root
``tests/conftest.py`` puts ``tests/`` on ``sys.path`` (benchmarks insert it themselves).

Nothing here runs at import time; heavy modules are imported inside the functions.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=1)
def _libggml() -> Any:
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(libdir / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    return lib


def ggml_quantize(weight: Any, ggml_type: int, imatrix: Any = None) -> Any:
    """Quantize a 2-D float32 numpy array with llama.cpp's own ``ggml_quantize_chunk`` (the code path
    ``llama-quantize`` runs), through the ``libggml-base`` that llama-cpp-python ships. Returns uint8 bytes
    ``(rows, nbytes_per_row)``."""
    import gguf
    import numpy as np

    w = np.ascontiguousarray(weight, dtype=np.float32)
    rows, n = w.shape
    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    if n % bs:  # ggml would write past the buffer
        raise ValueError(f"rows of {n} values do not fill blocks of {bs}")
    out = np.zeros((rows, n // bs * ts), dtype=np.uint8)
    lib = _libggml()
    lib.ggml_quantize_init(ggml_type)
    imp = None
    if imatrix is not None:
        im = np.ascontiguousarray(imatrix, dtype=np.float32)
        imp = im.ctypes.data
    size = lib.ggml_quantize_chunk(ggml_type, w.ctypes.data, out.ctypes.data, 0, rows, n, imp)
    if size != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {size} bytes, expected {out.nbytes}")
    return out


def weighted_sq_error(weight: Any, deq: Any, imatrix: Any = None) -> float:
    """Sum over elements of ``imatrix[col] * (w - deq)^2`` (plain squared error without an imatrix)."""
    import torch

    w = torch.as_tensor(weight, dtype=torch.float64)
    e = (w - torch.as_tensor(deq, dtype=torch.float64)) ** 2
    if imatrix is not None:
        e = e * torch.as_tensor(imatrix, dtype=torch.float64)[None, :]
    return float(e.sum())


def interpreter_downcast(ref: Any, dtype: Any) -> Any:
    """``ref`` (float32) cast to ``dtype`` the way a Triton kernel's store does it on this machine.

    Triton's CPU interpreter truncates float32 -> bfloat16 (round toward zero) even when asked for
    round-to-nearest-even; on a GPU the cast is round-to-nearest-even like ``Tensor.to``.
    """
    import torch

    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" and ref.device.type == "cpu":
        bits = ref.to(torch.float32).contiguous().view(torch.int32) & ~0xFFFF
        return bits.view(torch.float32).to(torch.bfloat16)
    return ref.to(dtype)


def llama_cpp_logits(gguf_path: Any, ids: list[int], n_ctx: int = 512) -> Any:
    """float64 logits ``(len(ids), vocab)`` of llama.cpp (llama-cpp-python) on token ``ids``, every position."""
    return llama_cpp_chunk_logits(gguf_path, [ids], n_ctx)[0]


def llama_cpp_chunk_logits(gguf_path: Any, chunks: list[list[int]], n_ctx: int = 512) -> list[Any]:
    """Logits of each token chunk, evaluated independently (fresh KV cache) with one model load."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    n = max([n_ctx, *map(len, chunks)])
    llm = Llama(model_path=str(gguf_path), n_ctx=n, logits_all=True, verbose=False, n_threads=2, n_batch=n)
    try:
        out = []
        for ids in chunks:
            llm.reset()
            llm.eval(ids)
            out.append(torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float64))
        return out
    finally:
        llm.close()


def llama_cpp_tokenize(gguf_path: Any, texts: list[str]) -> list[list[int]]:
    """llama.cpp's tokenization of ``texts`` (special tokens parsed, no BOS added)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]
    finally:
        llm.close()


def hf_logits(model_dir: Any, ids: list[int]) -> Any:
    """float64 logits of the HF model in ``model_dir`` run in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


def compare_logits(ref: Any, got: Any) -> dict[str, float]:
    """Mean KL(ref || got), top-1 agreement and max |logit difference| over positions."""
    import torch

    lp = torch.log_softmax(ref.double(), -1)
    lq = torch.log_softmax(got.double(), -1)
    kld = (lp.exp() * (lp - lq)).sum(-1)
    return {"kld": float(kld.mean()), "top1": float((ref.argmax(-1) == got.argmax(-1)).double().mean()),
            "max_diff": float((ref - got).abs().max())}


def quantize_with_llama_cpp(src_gguf: Any, out_gguf: Any, ftype: int, imatrix: Any = None) -> None:
    """Run llama.cpp's own quantizer (``llama_model_quantize``) on a GGUF file."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(out_gguf).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")


TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "tie_word_embeddings": True},
    "mistral": {"architectures": ["MistralForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
                "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
                "sliding_window": None},
    "llama": {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
              "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 32,
               "sliding_window": 64, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
               "hidden_activation": "gelu_pytorch_tanh"},
}


def train_spm_tokenizer(out_dir: Any, text_file: Any, vocab_size: int = 512) -> Path:
    """A small SentencePiece (BPE, byte fallback) tokenizer trained on ``text_file``: ``out_dir/tokenizer.model``."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, input_sentence_size=20000, shuffle_input_sentence=False,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    return out / "tokenizer.model"


def tiny_checkpoint(model_type: str, out_dir: Any, tokenizer_dir: Any, n_layers: int = 2, seed: int = 0,
                    init_std: float = 0.2) -> Path:
    """A random-weight checkpoint of ``model_type`` (bf16 safetensors) using the tokenizer files in
    ``tokenizer_dir``; weights are drawn wider than HF's default so logits are peaked enough to compare."""
    import json as _json
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Path(tokenizer_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "chat_template.jinja"):
        if (tok / name).is_file():
            shutil.copy(tok / name, out / name)
    if (tok / "tokenizer.json").is_file():
        vocab = len(_json.loads((tok / "tokenizer.json").read_text())["model"]["vocab"])
        vocab = max(vocab, 1 + max(t["id"] for t in _json.loads((tok / "tokenizer.json").read_text())["added_tokens"]))
    else:
        import sentencepiece as spm

        vocab = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model")).vocab_size()
    kwargs = dict(TINY_CONFIGS[model_type])
    kwargs.update(num_hidden_layers=n_layers, vocab_size=vocab, max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2, initializer_range=init_std, rms_norm_eps=1e-6)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) * 0.5 + (0.0 if model_type == "gemma2" else 0.75))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def tiny_llama(out: Any, seed: int = 0, hidden: int = 128, intermediate: int = 320, attention_bias: bool = True) -> Path:
    """A 2-layer random Llama in bf16 with an untied lm_head, attention biases (unless turned off) and dummy
    tokenizer side files; ``hidden``/``intermediate`` of 256 multiples fit the k-quant super-blocks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False,
                      attention_bias=attention_bias, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) * 0.5 + 0.75 if "norm" in name else torch.randn_like(p) * 0.2)
    model.to(torch.bfloat16).save_pretrained(out)
    (out / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (out / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return out


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def llama_cpp_read_imatrix(path: Any) -> dict[str, Any]:
    """Read a GGUF imatrix the way llama.cpp's ``common_imatrix_load`` (used by llama-quantize) does, with the
    C GGUF parser of the ``libggml-base`` that llama-cpp-python ships: ``gguf_init_from_file`` with tensor data
    loaded, the ``imatrix.*`` keys, and every ``X.in_sum2`` / ``X.counts`` pair, which must both be F32; counts
    are rounded to integers as llama.cpp rounds them. Returns ``{"datasets", "chunk_count", "chunk_size",
    "entries": {name: (sums float32 1-D, counts int64 1-D)}}``; raises ``ValueError`` where llama.cpp refuses."""
    import numpy as np

    lib = _libggml()
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn, res, args in (("gguf_init_from_file", vp, [ctypes.c_char_p, _GGUFInitParams]),
                          ("gguf_get_n_tensors", ctypes.c_int32, [vp]), ("gguf_find_key", i64, [vp, ctypes.c_char_p]),
                          ("gguf_get_kv_type", ctypes.c_int, [vp, i64]), ("gguf_get_arr_type", ctypes.c_int, [vp, i64]),
                          ("gguf_get_arr_n", ctypes.c_size_t, [vp, i64]),
                          ("gguf_get_arr_str", ctypes.c_char_p, [vp, i64, ctypes.c_size_t]),
                          ("gguf_get_val_u32", ctypes.c_uint32, [vp, i64]), ("gguf_free", None, [vp]),
                          ("ggml_free", None, [vp]), ("ggml_get_first_tensor", vp, [vp]),
                          ("ggml_get_next_tensor", vp, [vp, vp]), ("ggml_get_name", ctypes.c_char_p, [vp]),
                          ("ggml_nelements", i64, [vp]), ("ggml_get_data", vp, [vp])):
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = args
    ctx = ctypes.c_void_p()
    g = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(False, ctypes.pointer(ctx)))
    if not g:
        raise ValueError(f"llama.cpp's gguf_init_from_file refused {path}")
    try:
        if lib.gguf_get_n_tensors(g) < 1:
            raise ValueError("no data in the imatrix")
        keys = {k: lib.gguf_find_key(g, k.encode()) for k in ("imatrix.datasets", "imatrix.chunk_count",
                                                                "imatrix.chunk_size")}
        if -1 in keys.values():
            raise ValueError("missing imatrix metadata")
        d = keys["imatrix.datasets"]
        if lib.gguf_get_kv_type(g, d) != 9 or lib.gguf_get_arr_type(g, d) != 8:  # GGUF_TYPE_ARRAY of STRING
            raise ValueError("imatrix.datasets is not an array of strings")
        out: dict[str, Any] = {
            "datasets": [lib.gguf_get_arr_str(g, d, i).decode() for i in range(lib.gguf_get_arr_n(g, d))],
            "chunk_count": lib.gguf_get_val_u32(g, keys["imatrix.chunk_count"]),
            "chunk_size": lib.gguf_get_val_u32(g, keys["imatrix.chunk_size"]), "entries": {}}
        pairs: dict[str, dict[str, Any]] = {}
        t = lib.ggml_get_first_tensor(ctx)
        while t:
            name = lib.ggml_get_name(t).decode()
            for suffix in (".in_sum2", ".counts"):
                if name.endswith(suffix):
                    ttype = ctypes.cast(t, ctypes.POINTER(ctypes.c_int32))[0]  # ggml_tensor.type is the first field
                    if ttype != 0:  # GGML_TYPE_F32
                        raise ValueError(f"{name} is not F32")
                    n = lib.ggml_nelements(t)
                    vals = np.ctypeslib.as_array(ctypes.cast(lib.ggml_get_data(t), ctypes.POINTER(ctypes.c_float)),
                                                 shape=(n,)).copy()
                    pairs.setdefault(name[: -len(suffix)], {})[suffix] = vals
            t = lib.ggml_get_next_tensor(ctx, t)
        for name, pair in pairs.items():
            if len(pair) != 2:
                raise ValueError(f"mismatched sums and counts for {name}")
            out["entries"][name] = (pair[".in_sum2"], np.floor(pair[".counts"] + 0.5).astype(np.int64))
        return out
    finally:
        lib.gguf_free(g)
        lib.ggml_free(ctx)
