"""Stream a Hugging Face checkpoint into one GGUF file, one tensor at a time.

Pass 1 reads only safetensors headers to name, order and type every tensor; the GGUF header, metadata and
tensor table are written; pass 2 loads, transforms (Q/K permutation, Gemma norm +1), checks and encodes each
tensor and appends it. Peak memory is about one tensor plus its encoding. The file appears under its final
name only when complete.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import __version__
from ...errors import CorruptCheckpoint, InputError, MissingFile, PlanError
from ...formats import get_format
from ...io import atomic_file, check_output
from ...model_source import ModelSource
from ...presets import ModelShape, get_mix, mix_types
from . import arch as archmod
from .tokenizer import write_tokenizer

Progress = Callable[..., Iterable[Any]]


def _no_progress(items: Iterable[Any], **_: Any) -> Iterable[Any]:
    return items


@dataclass
class TensorJob:
    """One output tensor: where it comes from, what it becomes."""

    gguf_name: str
    hf_name: str | None
    shape: tuple[int, ...]
    fmt: str = "f32"


def _sort_key(name: str) -> tuple[int, int, str]:
    m = re.match(r"^blk\.(\d+)\.(.*)$", name)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (0 if name == "token_embd.weight" else 2, 0, name)


def plan_tensors(src: ModelSource, spec: archmod.ArchSpec) -> list[TensorJob]:
    """GGUF tensors of the model in llama.cpp's visiting order (block, then name), without loading data."""
    cfg = src.text_config
    tied = bool(cfg.get("tie_word_embeddings", src.config.get("tie_word_embeddings", False)))
    jobs: dict[str, TensorJob] = {}
    for name, info in src.tensors.items():
        if name == "lm_head.weight" and (tied or spec.drop_lm_head):
            continue
        gname = archmod.gguf_name(spec, name)
        if gname is None:
            continue
        jobs[gname] = TensorJob(gname, name, info.shape)
    if "token_embd.weight" not in jobs:
        raise CorruptCheckpoint("the checkpoint has no model.embed_tokens.weight", path=src.path)
    sc = archmod.rope_scaling(cfg)
    if spec.gguf_arch == "llama" and sc is not None and sc["rope_type"] == "llama3":
        jobs["rope_freqs.weight"] = TensorJob("rope_freqs.weight", None, (archmod.head_dim(cfg) // 2,))
    return [jobs[k] for k in sorted(jobs, key=_sort_key)]


def model_shape(src: ModelSource, jobs: list[TensorJob]) -> ModelShape:
    cfg = src.text_config
    return ModelShape(
        n_layer=int(cfg["num_hidden_layers"]),
        n_head=int(cfg["num_attention_heads"]),
        n_head_kv=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        tied_embeddings=not any(j.gguf_name == "output.weight" for j in jobs),
        n_expert=int(cfg.get("num_local_experts") or 0),
    )


def assign_types(jobs: list[TensorJob], qtype: str, shape: ModelShape, has_imatrix: bool,
                 plan_types: dict[str, str] | None = None) -> None:
    """Give every job its format: a plan's per-tensor types when given, else the mix's rules."""
    types = mix_types(qtype, [(j.gguf_name, j.shape) for j in jobs], shape, has_imatrix)
    if plan_types:
        unknown = sorted(set(plan_types) - set(types))
        if unknown:
            raise PlanError(f"plan names tensors the model does not have: {', '.join(unknown[:5])}")
        for name, fmt in plan_types.items():
            f = get_format(fmt)
            if not f.fits(dict((j.gguf_name, j.shape) for j in jobs)[name][-1]):
                raise PlanError(f"plan gives {name} type {fmt}, whose block size {f.block_size} does not divide "
                                "its rows")
            types[name] = fmt
    for j in jobs:
        j.fmt = types[j.gguf_name]


CHUNK_ELEMS = 1 << 22
ENCODED_QUEUE_BYTES = 256 << 20
"""How many bytes of encoded row chunks may wait for the writer (bounded memory; lets encoding run ahead of the
header and metadata, which are written first)."""


class EncodedTensor:
    """One output tensor encoded row chunk by row chunk while it is written.

    Duck-types the numpy array :meth:`gguf.GGUFWriter.write_tensor_data` expects (``nbytes``, ``tofile``), so
    at most one chunk of float32 rows and its encoding are in memory at a time. Rows are independent in every
    GGUF format, so the bytes equal those of encoding the whole tensor at once.
    """

    def __init__(self, src: ModelSource, spec: archmod.ArchSpec, job: TensorJob, imatrix: Any,
                 chunk_elems: int = CHUNK_ELEMS, device: str = "cpu") -> None:
        self.src, self.spec, self.job, self.imatrix, self.device = src, spec, job, imatrix, device
        self.fmt = get_format(job.fmt)
        self.nbytes = self.fmt.nbytes(job.shape)
        self.heads = archmod.qk_heads(spec, job.hf_name, src.text_config) if job.hf_name else None
        self.n_rows = n_rows = job.shape[0] if len(job.shape) > 1 else 1
        row_elems = max(1, self.fmt_numel() // n_rows)
        unit = n_rows // self.heads if self.heads else 1
        rows = max(unit, (chunk_elems // row_elems) // unit * unit)
        self.ranges = [(r, min(r + rows, n_rows)) for r in range(0, n_rows, rows)]

    def fmt_numel(self) -> int:
        n = 1
        for d in self.job.shape:
            n *= d
        return n

    def _rows(self, start: int, stop: int, device: str | None = None) -> Any:
        import torch

        job = self.job
        device = device or self.device
        if job.hf_name is None:
            return archmod.llama3_rope_freqs(self.src.text_config).reshape(1, -1).to(device)
        raw = self.src.get(job.hf_name, rows=(start, stop)) if len(job.shape) > 1 else self.src.get(job.hf_name)
        if device == "cpu":
            t, bad = _cpu_float32(raw)
        else:
            t = raw.to(device, torch.float32)
            bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise CorruptCheckpoint(f"tensor {job.hf_name!r} has {bad} NaN/Inf values",
                                    path=self.src.tensors[job.hf_name].file)
        if len(job.shape) == 1:
            t = t.reshape(1, -1)
        if self.heads is not None:
            t = archmod.permute_rows(t, self.heads * (stop - start) // job.shape[0])
        if self.spec.norm_plus_one and job.gguf_name.endswith("norm.weight"):
            t = t + 1.0
        return torch.as_tensor(t.reshape(t.shape[0], -1))

    def _imat(self, device: str) -> Any:
        if self.imatrix is None or not self.fmt.takes_imatrix:
            return None
        import torch

        imat = torch.as_tensor(self.imatrix, dtype=torch.float32).to(device)
        if imat.numel() != self.job.shape[-1]:
            raise InputError(f"imatrix entry for {self.job.gguf_name} has {imat.numel()} values, "
                             f"its rows have {self.job.shape[-1]}")
        return imat

    def encode(self, start: int, stop: int, device: str | None = None) -> Any:
        """Rows ``[start, stop)`` (one of :attr:`ranges`) encoded on ``device``: flat uint8 tensor on that device."""
        device = device or self.device
        return self.fmt.quantize(self._rows(start, stop, device), self._imat(device)).contiguous().reshape(-1)

    def range_nbytes(self, start: int, stop: int) -> int:
        """Bytes of the encoding of rows ``[start, stop)``."""
        if len(self.job.shape) < 2:
            return self.nbytes
        return self.fmt.nbytes((stop - start, *self.job.shape[1:]))

    def encoded_chunks(self) -> Iterable[Any]:
        for start, stop in self.ranges:
            yield self.encode(start, stop).cpu().numpy()

    def tofile(self, fout: Any) -> None:
        written = 0
        for chunk in self.encoded_chunks():
            fout.write(memoryview(chunk).cast("B"))
            written += chunk.nbytes
        if written != self.nbytes:
            raise InputError(f"{self.job.gguf_name}: encoded {written} bytes, expected {self.nbytes}")


class StreamedTensor:
    """One output tensor whose row chunks arrive already encoded (from threads or other ranks, in order);
    duck-types the array :meth:`gguf.GGUFWriter.write_tensor_data` expects, like :class:`EncodedTensor`."""

    def __init__(self, name: str, nbytes: int, chunks: Iterable[Any]) -> None:
        self.name, self.nbytes, self.chunks = name, nbytes, chunks

    def tofile(self, fout: Any) -> None:
        written = 0
        for chunk in self.chunks:
            fout.write(memoryview(chunk).cast("B"))
            written += chunk.nbytes
        if written != self.nbytes:
            raise InputError(f"{self.name}: received {written} encoded bytes, expected {self.nbytes}")


def size_label(n_params: int) -> str:
    """``135M``, ``8.0B``: the parameter count as llama.cpp's converter labels it."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n_params >= scale:
            value = n_params / scale
            return f"{value:.0f}{suffix}" if value >= 100 or suffix in "MK" else f"{value:.1f}{suffix}"
    return str(n_params)


def general_name(src: ModelSource) -> str:
    cfg = src.config
    name = cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or src.path.name
    return str(name).rstrip("/").split("/")[-1]


def export_gguf(model: str | os.PathLike[str], output: str | os.PathLike[str], qtype: str = "f16",
                imatrix: str | os.PathLike[str] | None = None, plan: str | os.PathLike[str] | None = None,
                force: bool = False, progress: Progress = _no_progress, device: str = "cpu",
                devices: Sequence[str] | None = None) -> Path:
    """Write ``model`` (a checkpoint folder or Hub id) as a GGUF file of mix ``qtype`` (or a plan's types, with the
    plan's recorded imatrix unless ``imatrix`` is given).
    ``device``, ``devices`` and distributed runs: see :func:`write_gguf`."""
    src = ModelSource.open(model)
    try:
        return write_gguf(src, output, qtype, imatrix=imatrix, plan=plan, force=force, progress=progress,
                          device=device, devices=devices)
    finally:
        src.close()


def write_gguf(src: ModelSource, output: str | os.PathLike[str], qtype: str = "f16",
               imatrix: str | os.PathLike[str] | None = None, plan: str | os.PathLike[str] | None = None,
               force: bool = False, progress: Progress = _no_progress, device: str = "cpu",
               chunk_elems: int = CHUNK_ELEMS, devices: Sequence[str] | None = None) -> Path:
    """Write the model behind ``src`` (anything shaped like :class:`ModelSource`) as GGUF; quantize on ``device``.

    ``devices`` (e.g. ``["cuda:0", "cuda:1"]``): one thread per device encodes its share of the row chunks while
    this thread writes them in order. In a distributed job (:func:`quantforge.distributed.current`) every rank
    calls this with the same arguments: the row chunks are split across ranks (``device="cuda"`` is each rank's
    own GPU). Ranks on one file system (one node, or ``QUANTFORGE_SHARED_FS=1``) write their chunks into the file
    themselves, in parallel; otherwise rank 0 receives the encoded bytes and writes them. The file is
    byte-identical to a one-process run in every case.
    """
    from ...distributed import current, drain, ordered_stream, shares_files

    mix = get_mix(qtype)
    spec = archmod.arch_for(src.model_type)
    jobs = plan_tensors(src, spec)
    group = current()
    plan_types = None
    if plan is not None:
        from ...plan import load_plan

        loaded = group.on_main(lambda: load_plan(plan))
        plan_types = loaded.gguf_types()
        if loaded.base_type:
            mix = get_mix(loaded.base_type)
        if imatrix is None:
            imatrix = group.on_main(lambda: plan_imatrix(loaded, plan))
    imat = None
    if imatrix is not None:
        from ...calibration.imatrix import load_imatrix

        imat = group.on_main(lambda: load_imatrix(imatrix))  # rank 0 reads it: the file need not be on every node
    assign_types(jobs, mix.name, model_shape(src, jobs), imat is not None, plan_types)
    n_vocab = jobs[0].shape[0]
    group.on_main(lambda: check_output(output, force))
    device = group.local_device(device)
    encoders = [EncodedTensor(src, spec, j, imat.for_tensor(j.gguf_name) if imat is not None else None,
                              chunk_elems=chunk_elems, device=device) for j in jobs]
    # the unit of work: one row chunk of one tensor, costed by its weight count
    units = [(e, a, b) for e in encoders for a, b in e.ranges]
    costs = [u[0].fmt_numel() * (u[2] - u[1]) / u[0].n_rows for u in units]
    devs = [group.local_device(d) for d in devices] if devices else [device]

    def head(tmp: Path) -> Any:
        return _write_head(tmp, src, spec, mix, jobs, n_vocab, imat, imatrix)

    if group.distributed and shares_files(group):
        return _write_shared(group, output, force, head, encoders, units, costs, devs, progress, mix.name)
    # encoded chunks may queue up to ENCODED_QUEUE_BYTES, so encoding runs ahead while the header is written
    depth = max(2, ENCODED_QUEUE_BYTES // max(1, max((e.range_nbytes(a, b) for e, a, b in units), default=1)))
    stream = ordered_stream(units, lambda u, dev: u[0].encode(u[1], u[2], dev),
                            lambda u: u[0].range_nbytes(u[1], u[2]), costs, group, devs, depth=depth)
    if not group.is_main:
        drain(stream)
        group.barrier()
        return Path(output)
    with contextlib.closing(stream), atomic_file(output, force=force) as tmp, _prompt_gil_handoff():
        w = head(tmp)
        chunks = iter(stream)
        for e in progress(encoders, total=len(encoders), desc=f"gguf {mix.name}", unit="tensor"):
            w.write_tensor_data(StreamedTensor(e.job.gguf_name, e.nbytes, itertools.islice(chunks, len(e.ranges))))
        w.close()
    group.barrier()
    return Path(output)


GIL_SWITCH_INTERVAL_S = 2e-4


@contextlib.contextmanager
def _prompt_gil_handoff() -> Any:
    """Shorten the interpreter's GIL switch interval (default 5 ms) while the header is written beside the
    encoding threads: each row chunk's encoder needs the GIL for a few dozen short steps between its GIL-free
    reads and C kernel calls, and would otherwise wait up to 5 ms for each while this thread builds the tokenizer
    metadata (measured on 2 cores: SmolLM2 q2_k ~10% faster). Restored afterwards; never lengthened."""
    import sys

    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, GIL_SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def plan_imatrix(plan: Any, plan_path: str | os.PathLike[str]) -> Path | None:
    """The importance matrix the plan's calibration recorded (``calibration.imatrix``), so a plan applies with the
    imatrix it was made with: relative to the plan file (as ``quantforge plan`` records it), else as written.
    ``None`` when the plan names none."""
    recorded = (plan.calibration or {}).get("imatrix")
    if not recorded:
        return None
    for candidate in (Path(plan_path).parent / recorded, Path(recorded)):
        if candidate.is_file():
            return candidate
    raise MissingFile(f"the plan's imatrix {recorded!r} was not found; pass --imatrix FILE, or delete "
                      "calibration.imatrix from the plan to quantize without one", path=plan_path)


def _write_head(tmp: Path, src: ModelSource, spec: archmod.ArchSpec, mix: Any, jobs: list[TensorJob],
                n_vocab: int, imat: Any, imatrix: Any) -> Any:
    """A :class:`gguf.GGUFWriter` on ``tmp`` with the header, metadata and tensor table written: the tensor data
    comes next."""
    import gguf

    from .bulk_writer import BulkGGUFWriter

    w = BulkGGUFWriter(str(tmp), spec.gguf_arch)
    w.add_type("model")
    w.add_name(general_name(src))
    w.add_size_label(size_label(sum(src.numel(n) for n in src.tensors)))
    w.add_quantized_by(f"quantforge {__version__}")
    archmod.write_hparams(w, spec, src.text_config)
    w.add_file_type(mix.file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if imat is not None:
        w.add_string("quantize.imatrix.file", Path(imatrix).name)
        w.add_array("quantize.imatrix.datasets", imat.datasets or ["unknown"])
        w.add_uint32("quantize.imatrix.entries_count", len(imat.entries))
        w.add_uint32("quantize.imatrix.chunks_count", int(imat.chunk_count))
    write_tokenizer(w, src.path, n_vocab)
    for j in jobs:
        f = get_format(j.fmt)
        w.add_tensor_info(j.gguf_name, f.byte_shape(j.shape), _np_u8(), f.nbytes(j.shape),
                          raw_dtype=gguf.GGMLQuantizationType(f.ggml_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _unit_offsets(encoders: list[EncodedTensor], align: int) -> tuple[list[int], int]:
    """Byte offset of every row chunk within the tensor-data section (tensors aligned as GGUFWriter aligns
    them), and the section's length."""
    offsets, pos = [], 0
    for e in encoders:
        row = 0
        for a, b in e.ranges:
            offsets.append(pos + row)
            row += e.range_nbytes(a, b)
        pos += _pad(e.nbytes, align)
    return offsets, pos


def _pwrite(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_shared(group: Any, output: Any, force: bool, head: Callable[[Path], Any], encoders: list[EncodedTensor],
                  units: list[Any], costs: list[float], devices: list[str], progress: Progress, label: str) -> Path:
    """Every rank writes its own row chunks straight into rank 0's temporary file at their final offsets (ranks
    that see one file system: :func:`quantforge.distributed.shares_files`), so no bytes travel between ranks
    and the writes run in parallel. Rank 0 writes the header and sizes the file first (the gaps between
    tensors stay zero, as GGUFWriter pads them); the file is renamed into place once every rank succeeded."""
    from ...distributed import ordered_map, partition, raise_any

    owners = partition(costs, group.world)
    mine = [i for i, o in enumerate(owners) if o == group.rank]

    def write_mine(tmp: str, start: int, offsets: list[int]) -> None:
        encoded = ordered_map(lambda i, dev: units[i][0].encode(units[i][1], units[i][2], dev).cpu().numpy(), mine,
                              devices, [costs[i] for i in mine], threaded=True)
        fd = os.open(tmp, os.O_WRONLY)
        try:
            with contextlib.closing(encoded):
                pairs = zip(mine, encoded, strict=True)
                for i, data in progress(pairs, total=len(mine), desc=f"gguf {label}", unit="chunk"):
                    e, a, b = units[i]
                    if data.nbytes != e.range_nbytes(a, b):
                        raise InputError(f"{e.job.gguf_name}: encoded {data.nbytes} bytes for rows {a}:{b}, "
                                         f"expected {e.range_nbytes(a, b)}")
                    _pwrite(fd, data, start + offsets[i])
        finally:
            os.close(fd)

    def run(layout: Any) -> None:
        failure: BaseException | None = None
        try:
            if layout is None:
                from ...distributed import DistributedError

                raise DistributedError("rank 0 failed before the tensor data; see its error")
            write_mine(*layout)
        except Exception as exc:
            failure = exc
        raise_any(group, failure)

    if not group.is_main:
        run(group.broadcast_object(None))
        group.barrier()
        return Path(output)
    with atomic_file(output, force=force) as tmp:
        try:
            w = head(tmp)
            fout = w.fout[0]
            fout.flush()
            offsets, length = _unit_offsets(encoders, w.data_alignment)
            start = _pad(fout.tell(), w.data_alignment)
            fout.truncate(start + length)
            w.close()
        except BaseException:
            group.broadcast_object(None)
            raise
        layout = group.broadcast_object((str(tmp), start, offsets))
        run(layout)
    group.barrier()
    return Path(output)


def _cpu_float32(t: Any) -> tuple[Any, int]:
    """A CPU tensor's values as a float32 NumPy array, and how many are NaN/Inf.

    The C kernels' one-pass widen-and-count when built (no GIL held), else NumPy; never ``Tensor.to``, whose
    OpenMP workers would spin between ops and take the cores from the quantizer threads."""
    import numpy as np
    import torch

    from ...kernels import _cpu_fast

    if _cpu_fast.library() is not None:
        out, bad = _cpu_fast.to_float32(t)
        return out.numpy(), bad
    if t.dtype == torch.bfloat16:
        arr = (t.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif t.dtype in (torch.float16, torch.float32, torch.float64):
        arr = t.numpy().astype(np.float32, copy=False)
    else:
        arr = t.to(torch.float32).numpy()
    finite = np.isfinite(arr)
    return arr, 0 if finite.all() else int(finite.size - np.count_nonzero(finite))


def _np_u8() -> Any:
    import numpy as np

    return np.dtype(np.uint8)
