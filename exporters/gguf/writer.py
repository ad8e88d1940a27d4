"""Stream a Hugging Face checkpoint into one GGUF file, one tensor at a time.

Pass 1 reads only safetensors headers to name, order and type every tensor; the GGUF header, metadata and
tensor table are written; pass 2 loads, transforms (Q/K permutation, Gemma norm +1), checks and encodes each
tensor row chunk by row chunk, through :mod:`.pipeline` (reads, device work and writes overlapped) in one
process. Peak memory is a few row chunks plus their encodings. The file appears under its final name only when
complete.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ... import __version__
from ... import arch as archmod
from ...arch_hparams import resolve_arch, write_hparams
from ...errors import CorruptCheckpoint, InputError, InternalError, MissingFile
from ...formats import get_format
from ...io import atomic_file, check_output
from ...model_source import ModelSource
from ...presets import get_mix
from ...tensor_layout import TensorJob, typed_jobs
from .tokenizer import write_tokenizer

Progress = Callable[..., Iterable[Any]]


def _no_progress(items: Iterable[Any], **_: Any) -> Iterable[Any]:
    return items


CHUNK_ELEMS = 1 << 22
ENCODED_QUEUE_BYTES = 256 << 20
"""How many bytes of encoded row chunks may wait for the writer (bounded memory; lets encoding run ahead of the
header and metadata, which are written first)."""


class EncodedTensor:
    """One output tensor, encoded row chunk by row chunk (:attr:`ranges`) so that only a few chunks of float32
    rows and their encodings are in memory at a time. Rows are independent in every GGUF format, so the bytes
    equal those of encoding the whole tensor at once.
    """

    def __init__(self, src: ModelSource, spec: archmod.ArchSpec, job: TensorJob, imatrix: Any,
                 chunk_elems: int = CHUNK_ELEMS, device: str = "cpu", rounder: Any = None) -> None:
        self.src, self.spec, self.job, self.imatrix, self.device = src, spec, job, imatrix, device
        self.rounder = rounder  # quantize(rows, imatrix) of an optimized rounding mode; None: the format's own
        self.fmt = get_format(job.fmt)
        self.nbytes = self.fmt.nbytes(job.shape)
        self.heads = archmod.qk_heads(spec, job.hf_name, src.text_config) if job.hf_name else None
        # rows of the tensor seen as 2-D (a stacked expert tensor's rows run expert after expert)
        self.n_rows = n_rows = self.fmt_numel() // job.shape[-1] if len(job.shape) > 1 else 1
        row_elems = max(1, self.fmt_numel() // n_rows)
        unit = n_rows // self.heads if self.heads else 1
        rows = max(unit, (chunk_elems // row_elems) // unit * unit)
        # a chunk never spans two experts: each expert is quantized with its own imatrix slice
        span = n_rows // job.n_experts if job.n_experts else n_rows
        self.ranges = [(r, min(r + rows, e + span)) for e in range(0, n_rows, span) for r in range(e, e + span, rows)]

    def fmt_numel(self) -> int:
        n = 1
        for d in self.job.shape:
            n *= d
        return n

    def raw_nbytes(self, start: int, stop: int) -> int:
        """Bytes :meth:`read` returns for rows ``[start, stop)`` (the checkpoint's own dtype)."""
        job = self.job
        if job.hf_name is None:
            return 4 * self.fmt_numel()
        width = _ST_WIDTH.get(self.src.tensors[job.hf_name].dtype, 4) if job.hf_name in self.src.tensors else 4
        return width * self.fmt_numel() * (stop - start) // self.n_rows

    def read(self, start: int, stop: int, pin: bool = False, fd: Callable[[Any], int] | None = None) -> Any:
        """Rows ``[start, stop)`` as stored in the checkpoint (a tensor in its own dtype, not yet transformed).

        For a plain tensor of a :class:`ModelSource` and a file-descriptor opener ``fd``, the bytes are read
        with one ``preadv`` straight into a new buffer, page-locked when ``pin`` (so that a copy to a GPU can
        run without waiting); other sources go through their ``get``, or their ``read_rows(name, rows,
        checkpoint)`` where they have one (``checkpoint()`` reads the rows as stored, as above; their
        ``finish_rows(name, raw, start, stop, device)`` then completes the rows in :meth:`prepare`)."""
        job = self.job
        if job.hf_name is None:
            return archmod.extra_tensor(job.gguf_name, self.src.text_config).reshape(1, -1)
        if job.segments:
            return read_segment_rows(self.src, job, start, stop)
        rows = (start, stop) if len(job.shape) > 1 else None
        if fd is not None and type(self.src).get is ModelSource.get:
            return _pread_rows(self.src, job.hf_name, rows, pin, fd)
        read_rows = getattr(self.src, "read_rows", None)  # a source that reads (part of) its tensors itself
        if read_rows is not None:
            return read_rows(job.hf_name, rows, lambda: _pread_rows(self.src, job.hf_name, rows, pin, fd)
                             if fd is not None else ModelSource.get(self.src, job.hf_name, rows))
        return self.src.get(job.hf_name, rows=rows) if rows else self.src.get(job.hf_name)

    def prepare(self, raw: Any, start: int, stop: int, device: str | None = None, check: bool = True) -> Any:
        """``raw`` (from :meth:`read`) as float32 rows on ``device``, transformed for GGUF (Q/K row permutation,
        Gemma's norm +1), and the count of NaN/Inf values. With ``check`` a bad value raises
        :class:`CorruptCheckpoint` here and the count is 0; without it, on a GPU, the count is left as a device
        tensor, so nothing waits for the device."""
        import torch

        job = self.job
        device = device or self.device
        finish_rows = getattr(self.src, "finish_rows", None)  # the device half of a source's read_rows
        if finish_rows is not None and job.hf_name is not None and not job.segments:
            raw = finish_rows(job.hf_name, raw, start, stop, device)
        if job.hf_name is None:
            t, bad = raw.to(device), 0
        elif device == "cpu" and raw.device.type == "cpu":
            t, bad = _cpu_float32(raw)
        else:
            t = raw.to(device, non_blocking=True).to(torch.float32)
            bad = (~torch.isfinite(t)).sum()
            if check or not t.is_cuda:
                bad = int(bad)
        if check and bad:
            raise CorruptCheckpoint(f"tensor {job.hf_name!r} has {bad} NaN/Inf values",
                                    path=self.src.tensors[job.hf_name].file)
        if len(job.shape) == 1:
            t = t.reshape(1, -1)
        if self.heads is not None:
            t = archmod.permute_rows(t, self.heads * (stop - start) // job.shape[0])
        if self.spec.norm_plus_one and job.gguf_name.endswith("norm.weight"):
            t = t + 1.0
        return torch.as_tensor(t.reshape(t.shape[0], -1)), bad

    def _rows(self, start: int, stop: int, device: str | None = None) -> Any:
        return self.prepare(self.read(start, stop), start, stop, device)[0]

    def _imat(self, device: str, start: int = 0) -> Any:
        """The imatrix values for rows from ``start`` on: the whole entry, or for a stacked expert tensor the
        slice of the expert those rows belong to (llama.cpp stores ``n_per_row`` values per expert)."""
        if self.imatrix is None or not self.fmt.takes_imatrix:
            return None
        import torch

        imat = torch.as_tensor(self.imatrix, dtype=torch.float32).to(device)
        n, n_mat = self.job.shape[-1], max(1, self.job.n_experts)
        if imat.numel() != n * n_mat:
            raise InputError(f"imatrix entry for {self.job.gguf_name} has {imat.numel()} values, expected "
                             f"{n * n_mat} ({n_mat} x rows of {n})")
        if n_mat > 1:
            expert = start // (self.n_rows // n_mat)
            imat = imat[expert * n:(expert + 1) * n]
        return imat

    def encode(self, start: int, stop: int, device: str | None = None) -> Any:
        """Rows ``[start, stop)`` (one of :attr:`ranges`) encoded on ``device``: flat uint8 tensor on that device."""
        return self.encode_raw(self.read(start, stop), start, stop, device)

    def encode_raw(self, raw: Any, start: int, stop: int, device: str | None = None) -> Any:
        """:meth:`encode` of rows already read (``raw`` from :meth:`read`)."""
        device = device or self.device
        return self.quantize(self.prepare(raw, start, stop, device)[0], start, device)

    def quantize(self, rows: Any, start: int, device: str) -> Any:
        """Prepared rows (starting at row ``start``) encoded: flat uint8 tensor on ``device``."""
        quantize = self.rounder or self.fmt.quantize
        return quantize(rows, self._imat(device, start)).contiguous().reshape(-1)

    def range_nbytes(self, start: int, stop: int) -> int:
        """Bytes of the encoding of rows ``[start, stop)``."""
        if len(self.job.shape) < 2:
            return self.nbytes
        return self.fmt.nbytes((stop - start, self.job.shape[-1]))


_ST_WIDTH = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


def _pread_rows(src: ModelSource, name: str, rows: tuple[int, int] | None, pin: bool,
                fd: Callable[[Any], int]) -> Any:
    """Rows ``[start, stop)`` of checkpoint tensor ``name`` (all of it for ``None``) read with one ``preadv`` into
    a fresh tensor of its dtype, page-locked when ``pin``; same values as :meth:`ModelSource.get`."""
    import torch

    info = src.tensors[name]
    if info.dtype not in _ST_WIDTH:
        return src.get(name, rows=rows) if rows else src.get(name)
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[info.dtype]
    start, stop = rows if rows is not None else (0, info.shape[0] if info.shape else 1)
    row_elems = 1
    for d in info.shape[1:]:
        row_elems *= d
    width = _ST_WIDTH[info.dtype]
    nbytes = (stop - start) * row_elems * width
    shape = (stop - start, *info.shape[1:]) if info.shape else ()
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    got = os.preadv(fd(info.file), [memoryview(buf.numpy())], info.offset + start * row_elems * width) if nbytes else 0
    if got != nbytes:
        raise CorruptCheckpoint(f"tensor {name!r} is cut short ({got} of {nbytes} bytes)", path=info.file)
    return buf.view(dtype).reshape(shape)


def read_segment_rows(src: ModelSource, job: TensorJob, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of a stacked expert tensor (rows counted over all experts), read from the
    checkpoint tensors its segments name, one expert at a time (a chunk lies within one expert)."""
    import torch

    out, pos = [], 0
    for seg in job.segments:
        n = seg.stop - seg.start
        a, b = max(start, pos), min(stop, pos + n)
        if a < b:
            lo, hi = seg.start + a - pos, seg.start + b - pos
            if seg.expert is None:
                out.append(src.get(seg.hf_name, rows=(lo, hi)))
            else:
                out.append(src.get(seg.hf_name, rows=(seg.expert, seg.expert + 1))[0, lo:hi])
        pos += n
    return out[0] if len(out) == 1 else torch.cat(out)


class RowChunk(NamedTuple):
    """The unit of work: rows ``[start, stop)`` of one output tensor."""

    tensor: EncodedTensor
    start: int
    stop: int

    def encode(self, device: str | None = None) -> Any:
        return self.tensor.encode(self.start, self.stop, device)

    @property
    def nbytes(self) -> int:
        return self.tensor.range_nbytes(self.start, self.stop)

    @property
    def cost(self) -> float:
        """The chunk's weight count, by which work is shared out."""
        return self.tensor.fmt_numel() * (self.stop - self.start) / self.tensor.n_rows


class SharedLayout(NamedTuple):
    """Where ranks writing into one shared file put their chunks: rank 0's temporary file, the offset of the
    tensor-data section, and each chunk's offset within that section."""

    path: str
    start: int
    offsets: list[int]


class StreamedTensor:
    """One output tensor whose row chunks arrive already encoded (from threads or other ranks, in order);
    duck-types the numpy array :meth:`gguf.GGUFWriter.write_tensor_data` expects (``nbytes``, ``tofile``)."""

    def __init__(self, name: str, nbytes: int, chunks: Iterable[Any]) -> None:
        self.name, self.nbytes, self.chunks = name, nbytes, chunks

    def tofile(self, fout: Any) -> None:
        written = 0
        for chunk in self.chunks:
            fout.write(memoryview(chunk).cast("B"))
            written += chunk.nbytes
        if written != self.nbytes:
            raise InternalError(f"{self.name}: received {written} encoded bytes, expected {self.nbytes}")


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
                devices: Sequence[str] | None = None, optimize: str = "rtn",
                hessians: str | os.PathLike[str] | None = None) -> Path:
    """Write ``model`` (a checkpoint folder or Hub id) as a GGUF file of mix ``qtype`` (or a plan's types, with the
    plan's recorded imatrix unless ``imatrix`` is given).
    ``device``, ``devices`` and distributed runs: see :func:`write_gguf`; ``optimize`` and ``hessians``: the
    rounding mode and the calibration's input second moments (:func:`quantforge.rounding.build_rounders`)."""
    src = ModelSource.open(model)
    try:
        return write_gguf(src, output, qtype, imatrix=imatrix, plan=plan, force=force, progress=progress,
                          device=device, devices=devices, optimize=optimize, hessians=hessians)
    finally:
        src.close()


def write_gguf(src: ModelSource, output: str | os.PathLike[str], qtype: str = "f16",
               imatrix: str | os.PathLike[str] | None = None, plan: str | os.PathLike[str] | None = None,
               force: bool = False, progress: Progress = _no_progress, device: str = "cpu",
               chunk_elems: int | None = None, devices: Sequence[str] | None = None, optimize: str = "rtn",
               hessians: str | os.PathLike[str] | None = None, pipelined: bool = True) -> Path:
    """Write the model behind ``src`` (anything shaped like :class:`ModelSource`) as GGUF; quantize on ``device``.

    ``devices`` (e.g. ``["cuda:0", "cuda:1"]``): one thread per device encodes its share of the row chunks while
    this thread writes them in order. In a distributed job (:func:`quantforge.distributed.current`) every rank
    calls this with the same arguments: the row chunks are split across ranks (``device="cuda"`` is each rank's
    own GPU). Ranks on one file system (one node, or ``QUANTFORGE_SHARED_FS=1``) write their chunks into the file
    themselves, in parallel; otherwise rank 0 receives the encoded bytes and writes them. The file is
    byte-identical to a one-process run in every case.

    ``chunk_elems``: weights per row chunk (default: :data:`CHUNK_ELEMS` on the CPU, larger on GPUs). In one
    process the chunks go through :class:`~.pipeline.PipelinedStream` (reads, transfers, encoding and writes
    overlapped); ``pipelined=False`` encodes each chunk in turn on one thread per device (same bytes).
    """
    from ...distributed import current, drain, ordered_stream, shares_files
    from .pipeline import PipelinedStream, chunk_elems_for, write_at_offsets

    mix = get_mix(qtype)
    spec = resolve_arch(src.model_type, src.text_config)
    group = current()
    plan_types = None
    plan_modes: dict[str, str] = {}
    if plan is not None:
        from ...plan import load_plan

        loaded = group.on_main(lambda: load_plan(plan, target="gguf"))
        plan_types = loaded.gguf_types()
        plan_modes = loaded.optimize_modes()
        if loaded.base_type:
            mix = get_mix(loaded.base_type)
        if imatrix is None:
            imatrix = group.on_main(lambda: plan_imatrix(loaded, plan))
    imat = None
    if imatrix is not None:
        from ...imatrix import load_imatrix

        imat = group.on_main(lambda: load_imatrix(imatrix))  # rank 0 reads it: the file need not be on every node
    jobs = typed_jobs(src, spec, mix.name, imat is not None, plan_types)
    n_vocab = jobs[0].shape[0]
    group.on_main(lambda: check_output(output, force))
    device = group.local_device(device)
    devs = [group.local_device(d) for d in devices] if devices else [device]
    if chunk_elems is None:
        chunk_elems = min(chunk_elems_for(d, CHUNK_ELEMS) for d in devs)
    from ...rounding import build_rounders

    rounders = build_rounders({j.gguf_name: j.fmt for j in jobs}, optimize, plan_modes, hessians)
    encoders = [EncodedTensor(src, spec, j, imat.for_tensor(j.gguf_name) if imat is not None else None,
                              chunk_elems=chunk_elems, device=device, rounder=rounders.get(j.gguf_name))
                for j in jobs]
    units = [RowChunk(e, a, b) for e in encoders for a, b in e.ranges]
    costs = [u.cost for u in units]

    def head(tmp: Path) -> Any:
        return _write_head(tmp, src, spec, mix, jobs, n_vocab, imat, imatrix)

    if group.distributed and shares_files(group):
        return _write_shared(group, output, force, head, encoders, units, costs, devs, progress, mix.name)
    # encoded chunks may queue up to ENCODED_QUEUE_BYTES, so encoding runs ahead while the header is written
    depth = max(2, ENCODED_QUEUE_BYTES // max(1, max((u.nbytes for u in units), default=1)))
    if pipelined and not group.distributed:
        with contextlib.closing(PipelinedStream(units, devs, costs, out_depth=depth)) as chunks, \
                atomic_file(output, force=force) as tmp, _prompt_gil_handoff():
            start, offsets = _size_file(head(tmp), encoders)
            write_at_offsets(tmp, start, offsets, chunks, units, progress, f"gguf {mix.name}")
        return Path(output)
    else:
        stream = ordered_stream(units, lambda u, dev: u.encode(dev), lambda u: u.nbytes, costs, group, devs,
                                depth=depth)
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
    write_hparams(w, spec, src.text_config)
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


def _size_file(w: Any, encoders: list[EncodedTensor]) -> tuple[int, list[int]]:
    """Close the writer ``w`` (header, metadata and tensor table written) after sizing its file for the tensor
    data: the gaps between tensors stay zero, as GGUFWriter pads them. Returns the offset of the tensor-data
    section and every row chunk's offset within it."""
    fout = w.fout[0]
    fout.flush()
    offsets, length = _unit_offsets(encoders, w.data_alignment)
    start = _pad(fout.tell(), w.data_alignment)
    fout.truncate(start + length)
    w.close()
    return start, offsets


def _write_shared(group: Any, output: Any, force: bool, head: Callable[[Path], Any], encoders: list[EncodedTensor],
                  units: list[RowChunk], costs: list[float], devices: list[str], progress: Progress,
                  label: str) -> Path:
    """Every rank writes its own row chunks straight into rank 0's temporary file at their final offsets (ranks
    that see one file system: :func:`quantforge.distributed.shares_files`), so no bytes travel between ranks
    and the writes run in parallel. Rank 0 writes the header and sizes the file first (the gaps between
    tensors stay zero, as GGUFWriter pads them); the file is renamed into place once every rank succeeded."""
    from ...distributed import partition, raise_any
    from .pipeline import PipelinedStream, write_at_offsets

    owners = partition(costs, group.world)
    mine = [i for i, o in enumerate(owners) if o == group.rank]

    def write_mine(tmp: str, start: int, offsets: list[int]) -> None:
        own = [units[i] for i in mine]
        with contextlib.closing(PipelinedStream(own, devices, [costs[i] for i in mine])) as encoded:
            write_at_offsets(tmp, start, [offsets[i] for i in mine], encoded, own, progress, f"gguf {label}")

    def run(layout: SharedLayout | None) -> None:
        failure: BaseException | None = None
        try:
            if layout is None:
                from ...distributed import DistributedError

                raise DistributedError("rank 0 failed before the tensor data; see its error")
            write_mine(layout.path, layout.start, layout.offsets)
        except Exception as exc:
            failure = exc
        raise_any(group, failure)

    if not group.is_main:
        run(group.broadcast_object(None))
        group.barrier()
        return Path(output)
    with atomic_file(output, force=force) as tmp:
        try:
            start, offsets = _size_file(head(tmp), encoders)
        except BaseException:
            group.broadcast_object(None)
            raise
        layout = group.broadcast_object(SharedLayout(str(tmp), start, offsets))
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
