"""AGsparse: all-gather every rank's COO entries and sum them locally.

This is what PyTorch's gloo sparse all-reduce and Horovod's sparse path do
(Zen's Table 3: Centralization, One-shot aggregation). Every rank sends its
``d M`` entries to ``n - 1`` peers, so the bytes grow with ``n`` and with no
benefit from overlap: ``(n-1) d M (s_i + s_v)`` per rank.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist

from thrifty.comm import collectives
from thrifty.zen.schemes.base import Reduced, SparseScheme
from thrifty.zen.sparse_rows import (
    SparseRows,
    decode_coo,
    encode_coo,
    sum_duplicate_rows,
    wire_index_dtype,
)

__all__ = ["AllGatherSparse"]


class AllGatherSparse(SparseScheme):
    """One variable-size all-gather of (indices, values); every rank sums all of them."""

    name: ClassVar[str] = "agsparse"
    code: ClassVar[int] = 2

    def reduce(self, rows: SparseRows, group: dist.ProcessGroup | None = None) -> Reduced:
        index_dtype = wire_index_dtype(rows.num_rows)
        payload = encode_coo(rows.indices, rows.values, index_dtype)
        gathered = collectives.all_gather_v(payload, group=group)
        parts = [decode_coo(b, rows.row_numel, rows.dtype, index_dtype) for b in gathered]  # type: ignore[union-attr]
        indices = torch.cat([p[0] for p in parts])
        values = torch.cat([p[1] for p in parts])
        return rows.like(*sum_duplicate_rows(indices, values))
