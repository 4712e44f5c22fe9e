"""What every sparse synchronisation scheme implements.

A scheme turns every rank's :class:`~thrifty.zen.sparse_rows.SparseRows` into
their *sum* over the group, identical on every rank; averaging, input checks
and converting back to a tensor are done once, by
:func:`thrifty.zen.sync.sync_sparse`. A scheme may return the sum as rows or,
when it ends up dense anyway, as a dense ``[num_rows, row_numel]`` tensor.

All traffic goes through :mod:`thrifty.comm.collectives`, so
:func:`~thrifty.comm.collectives.count_bytes` sees every byte a scheme sends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch.distributed as dist
from torch import Tensor

from thrifty.zen.sparse_rows import SparseRows

__all__ = ["Reduced", "SparseScheme", "group_rank_and_size"]

Reduced = SparseRows | Tensor
"""A scheme's result: summed rows, or a dense ``[num_rows, row_numel]`` tensor."""


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


class SparseScheme(ABC):
    """One way to sum sparse tensors across ranks."""

    name: ClassVar[str]
    """The name :func:`thrifty.zen.sync.sync_sparse` knows it by."""
    code: ClassVar[int]
    """A stable number for the cross-rank agreement check."""

    def key(self) -> tuple[int, int, int]:
        """Scheme code and the settings every rank must share (checked before syncing)."""
        return (self.code, 0, 0)

    @abstractmethod
    def reduce(self, rows: SparseRows, group: dist.ProcessGroup | None = None) -> Reduced:
        """The sum of every rank's ``rows``, the same on every rank."""
