"""Fuzzing readers with Hypothesis: byte-level mutations of a valid file (truncations, bit flips, huge counts and
wrong type ids written over the file's own length and type fields, random overwrites), a guard that runs one case
and checks its outcome, and a count of the cases each reader saw (printed at the end of the test run by
``tests/conftest.py``)."""

from __future__ import annotations

import collections
import struct
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

CASES: collections.Counter[str] = collections.Counter()
"""Cases run per reader in this test run."""

MAX_CPU_S = 1.0
"""Every case ends within this much CPU time of the test thread (CPU, not wall time: the machine is shared)."""
MAX_WALL_S = 10.0
"""A case that sleeps or waits this long counts as a hang."""
MAX_ALLOC_BYTES = 64 << 20
"""Peak Python/NumPy allocation of one case (the fuzzed files are a few KiB)."""

HUGE = [0, 1, 3, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


@dataclass(frozen=True)
class Field:
    """A length/count (``kind="length"``) or type id (``kind="type"``) of ``width`` bytes at ``offset``."""

    offset: int
    width: int
    kind: str


def _overwrite(data: bytes, field: Field, value: int) -> bytes:
    fmt = "<Q" if field.width == 8 else "<I"
    value %= 1 << (8 * field.width)
    return data[: field.offset] + struct.pack(fmt, value) + data[field.offset + field.width:]


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, bit in flips:
        out[pos % len(out)] ^= 1 << bit
    return bytes(out)


def mutations(data: bytes, fields: list[Field]) -> st.SearchStrategy[bytes]:
    """Corrupted variants of ``data``: cut short, bits flipped, a length set huge, a type id set wrong, bytes
    overwritten."""
    n = len(data)
    truncated = st.integers(0, n - 1).map(lambda k: data[:k])
    flipped = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 7)), min_size=1, max_size=8).map(
        lambda fl: _flip(data, fl))
    overwritten = st.tuples(st.integers(0, n - 1), st.binary(min_size=1, max_size=16)).map(
        lambda t: (data[: t[0]] + t[1] + data[t[0] + len(t[1]):])[:n])
    options = [truncated, flipped, overwritten]
    lengths = [f for f in fields if f.kind == "length"]
    types = [f for f in fields if f.kind == "type"]
    if lengths:
        options.append(st.tuples(st.sampled_from(lengths), st.sampled_from(HUGE) | st.integers(0, 2**64 - 1)).map(
            lambda t: _overwrite(data, *t)))
    if types:
        options.append(st.tuples(st.sampled_from(types), st.integers(0, 40) | st.integers(0, 2**32 - 1)).map(
            lambda t: _overwrite(data, *t)))
    return st.one_of(options)


def gguf_fields(path: Any) -> list[Field]:
    """The length, count and type fields of a valid GGUF file: header counts, every key's length and value type,
    string lengths, array item types and counts, tensor name lengths, dimension counts, dimensions and types."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out = [Field(4, 4, "type"), Field(8, 8, "length"), Field(16, 8, "length")]
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        at = f.offset + 8 + len(key.encode())
        out += [Field(f.offset, 8, "length"), Field(at, 4, "type")]
        if f.types[0] == gguf.GGUFValueType.STRING:
            out.append(Field(at + 4, 8, "length"))
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            out += [Field(at + 4, 4, "type"), Field(at + 8, 8, "length")]
    for t in r.tensors:
        at = t.field.offset + 8 + len(t.name.encode())
        n_dims = len(t.shape)
        out += [Field(t.field.offset, 8, "length"), Field(at, 4, "length")]
        out += [Field(at + 4 + 8 * i, 8, "length") for i in range(n_dims)]
        out += [Field(at + 4 + 8 * n_dims, 4, "type"), Field(at + 8 + 8 * n_dims, 8, "length")]
    return out


def run_case(reader: str, fn: Callable[[], Any], expected: type[BaseException]) -> None:
    """Run one case: it either succeeds or raises ``expected`` (a typed quantforge error); any other exception
    propagates and fails the test. It must end within :data:`MAX_CPU_S` of CPU time and allocate at most
    :data:`MAX_ALLOC_BYTES` at its peak."""
    CASES[reader] += 1
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    cpu, wall = time.thread_time(), time.perf_counter()
    try:
        fn()
    except expected:
        pass
    finally:
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        peak = tracemalloc.get_traced_memory()[1] - base
        if not started:
            tracemalloc.stop()
    assert cpu < MAX_CPU_S and wall < MAX_WALL_S, f"{reader}: one case took {cpu:.2f} s CPU, {wall:.2f} s wall"
    assert peak < MAX_ALLOC_BYTES, f"{reader}: one case allocated {peak / 2**20:.0f} MiB at its peak"
