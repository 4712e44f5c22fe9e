"""Baseline: densify and ring all-reduce, ``2(n-1)/n * M`` values per rank whatever the density."""

from __future__ import annotations

from typing import ClassVar

import torch.distributed as dist

from thrifty.comm import collectives
from thrifty.zen.schemes.base import Reduced, SparseScheme
from thrifty.zen.sparse_rows import SparseRows

__all__ = ["DenseAllReduce"]


class DenseAllReduce(SparseScheme):
    """Scatter the rows into a dense tensor and all-reduce it (what DDP does by default)."""

    name: ClassVar[str] = "dense"
    code: ClassVar[int] = 1

    def reduce(self, rows: SparseRows, group: dist.ProcessGroup | None = None) -> Reduced:
        dense = rows.to_dense_rows()
        collectives.all_reduce(dense, group=group)
        return dense
