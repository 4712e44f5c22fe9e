"""Hierarchical Centralization (HC), SparCML's recursive doubling with incremental aggregation.

In stage ``i`` every rank swaps its running sum with the rank ``2^i`` away and
adds what it receives, so after ``log2 n`` stages every rank holds the whole
sum (Zen's Table 3: Hierarchy, Incremental, Centralization). An index common
to all ranks is received ``log n`` times instead of ``n - 1`` (Lemma 2), and
in stage ``i`` a rank sends the union of ``2^(i-1)`` tensors:
``sum_i gamma^(2^(i-1)) d M (s_i + s_v)`` per rank (Eq. 2).

The running sum densifies. Like SparCML's sparse streams, a rank switches to
sending it dense once COO would be larger (or, with ``dense_threshold``, once
its density passes that threshold, whichever comes first). The receiver tells
the format from the size the exchange already reports: a dense message is
exactly ``M`` rows, and COO is only ever sent when strictly smaller.

When ``n`` is not a power of two, with ``m`` the largest power of two below
it, ranks ``m .. n-1`` first fold their tensor into ranks ``0 .. n-m-1``,
the ``m`` ranks run recursive doubling, and the folded ranks get the result
back at the end (the usual MPI treatment).

Each exchange is one :func:`~thrifty.comm.collectives.all_to_all_v` in which
a rank sends to at most one peer; with gloo this needs no point-to-point
calls and every byte is counted.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from thrifty.comm import collectives
from thrifty.zen.schemes.base import Reduced, SparseScheme, group_rank_and_size
from thrifty.zen.sparse_rows import (
    SparseRows,
    decode_coo,
    encode_coo,
    sum_duplicate_rows,
    wire_index_dtype,
)

__all__ = ["HierarchicalCentralization"]


class HierarchicalCentralization(SparseScheme):
    """SparCML-style recursive doubling (SSAR_Recursive_double) with a dense switch.

    Args:
        dense_threshold: density (non-zero rows / rows) from which the running
            sum is sent dense. ``None`` switches exactly where dense becomes
            smaller than COO, ``s_v / (s_i + s_v)`` for one value per index.
    """

    name: ClassVar[str] = "sparcml"
    code: ClassVar[int] = 3

    def __init__(self, dense_threshold: float | None = None) -> None:
        if dense_threshold is not None and not 0.0 <= dense_threshold <= 1.0:
            raise ValueError(f"dense_threshold must be in [0, 1] or None, got {dense_threshold}")
        self.dense_threshold = dense_threshold

    def key(self) -> tuple[int, int, int]:
        threshold = -1 if self.dense_threshold is None else round(self.dense_threshold * 1e9)
        return (self.code, threshold, 0)

    def reduce(self, rows: SparseRows, group: dist.ProcessGroup | None = None) -> Reduced:
        rank, n = group_rank_and_size(group)
        run = _RunningSum(rows, self.dense_threshold)
        core = 1 << (n.bit_length() - 1)  # largest power of two <= n
        extra = n - core
        if extra:  # fold ranks core.. into 0..extra-1
            to = rank - core if rank >= core else None
            got = _exchange(run, group, n, to=to, source=rank + core if rank < extra else None)
            if got is not None:
                run.add(got)
        distance = 1
        while distance < core:
            partner = rank ^ distance if rank < core else None
            got = _exchange(run, group, n, to=partner, source=partner)
            if got is not None:
                run.add(got)
            distance *= 2
        if extra:  # unfold: the folded ranks receive the finished sum
            to = rank + core if rank < extra else None
            got = _exchange(run, group, n, to=to, source=rank - core if rank >= core else None)
            if got is not None:
                run.replace(got)
        return run.result()


class _RunningSum:
    """A rank's partial sum, COO until dense is no larger."""

    def __init__(self, rows: SparseRows, dense_threshold: float | None) -> None:
        self.rows = rows
        self.index_dtype = wire_index_dtype(rows.num_rows)
        self.dense_bytes = rows.num_rows * rows.row_numel * rows.dtype.itemsize
        self.entry_bytes = self.index_dtype.itemsize + rows.row_numel * rows.dtype.itemsize
        self.dense_threshold = dense_threshold
        self.indices: Tensor = rows.indices
        self.values: Tensor = rows.values
        self.dense: Tensor | None = None

    def _sends_dense(self) -> bool:
        if self.dense is not None:
            return True
        count = self.indices.numel()
        if count * self.entry_bytes >= self.dense_bytes:
            return True
        return (
            self.dense_threshold is not None and count >= self.dense_threshold * self.rows.num_rows
        )

    def encode(self) -> Tensor:
        if self._sends_dense():
            return self._as_dense().reshape(-1).view(torch.uint8)
        return encode_coo(self.indices, self.values, self.index_dtype)

    def _as_dense(self) -> Tensor:
        if self.dense is None:
            self.dense = self.rows.like(self.indices, self.values).to_dense_rows()
        return self.dense

    def _decode(self, buffer: Tensor) -> tuple[Tensor, Tensor] | Tensor:
        rows = self.rows
        if buffer.numel() == self.dense_bytes:
            return buffer.clone().view(rows.dtype).view(rows.num_rows, rows.row_numel)
        return decode_coo(buffer, rows.row_numel, rows.dtype, self.index_dtype)

    def add(self, buffer: Tensor) -> None:
        # Partners compute a + b and b + a: with two operands per element the
        # results are bitwise equal, so every rank ends with the same tensor.
        received = self._decode(buffer)
        if isinstance(received, Tensor):
            if self.dense is not None:
                self.dense = self.dense + received
            else:
                self.dense = received.index_put((self.indices,), self.values, accumulate=True)
            return
        indices, values = received
        if self.dense is not None:
            self.dense = self.dense.index_put((indices,), values, accumulate=True)
        else:
            self.indices, self.values = sum_duplicate_rows(
                torch.cat([self.indices, indices]), torch.cat([self.values, values])
            )

    def replace(self, buffer: Tensor) -> None:
        received = self._decode(buffer)
        if isinstance(received, Tensor):
            self.dense = received
        else:
            self.indices, self.values = received
            self.dense = None

    def result(self) -> Reduced:
        if self.dense is not None:
            return self.dense
        return self.rows.like(self.indices, self.values)


def _exchange(
    run: _RunningSum, group: dist.ProcessGroup | None, n: int, to: int | None, source: int | None
) -> Tensor | None:
    """Send the running sum to ``to`` and receive from ``source`` (either may be None)."""
    empty = torch.empty(0, dtype=torch.uint8)
    chunks = [empty] * n
    if to is not None:
        chunks[to] = run.encode()
    received = collectives.all_to_all_v(chunks, group=group)
    return None if source is None else received[source]  # type: ignore[index]
