"""What every sparse synchronisation scheme implements, and the one path every call takes.

A scheme turns every rank's :class:`~thrifty.zen.sparse_rows.SparseRows` into
their *sum* over the group, identical on every rank (:meth:`SparseScheme.reduce`);
it may return the sum as rows or, when it ends up dense anyway, as a dense
``[num_rows, row_numel]`` tensor. Checking the inputs, averaging and converting
back to a tensor are done once, around it, by :func:`run_sync`: what both
:func:`thrifty.zen.sync.sync_sparse` and :meth:`SparseScheme.sync` (the method
``GradientSync`` calls for a sparse gradient) run.

All traffic goes through :mod:`thrifty.comm.collectives`, so
:func:`~thrifty.comm.collectives.count_bytes` sees every byte a scheme sends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch.distributed as dist
from torch import Tensor

from thrifty.zen.sparse_rows import SparseRows, rows_from_dense
from thrifty.zen.validation import SparseSyncError, check_inputs

__all__ = ["OUTPUTS", "Output", "Reduced", "SparseScheme", "group_rank_and_size", "run_sync"]

Reduced = SparseRows | Tensor
"""A scheme's result: summed rows, or a dense ``[num_rows, row_numel]`` tensor."""

Output = Literal["sparse", "dense"]
OUTPUTS: tuple[Output, ...] = ("sparse", "dense")


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


class SparseScheme(ABC):
    """One way to sum sparse tensors across ranks."""

    name: ClassVar[str]
    """The name :func:`thrifty.zen.sync.sync_sparse` knows it by."""
    code: ClassVar[int]
    """A stable number for the cross-rank agreement check."""
    reports_nonfinite: ClassVar[bool] = True
    """NaN/Inf on any rank raises the same :class:`SparseSyncError` on every rank, with a
    ``nonfinite`` ``{rank: count}`` attribute (its input check carries the counts), so
    ``GradientSync`` needs no extra collective to agree on them."""

    def key(self) -> tuple[int, int, int]:
        """Scheme code and the settings every rank must share (checked before syncing)."""
        return (self.code, 0, 0)

    def describe(self) -> str:
        """Name and settings, for ``GradientSync``'s check that every rank agrees."""
        return f"{self.name}{self.key()}"

    @abstractmethod
    def reduce(self, rows: SparseRows, group: dist.ProcessGroup | None = None) -> Reduced:
        """The sum of every rank's ``rows``, the same on every rank."""

    def sync(
        self,
        tensor: Tensor,
        group: dist.ProcessGroup | None = None,
        average: bool = True,
        *,
        output: Output = "sparse",
        check: bool = True,
    ) -> Tensor:
        """``sync_sparse(tensor, self, group, ...)``: this scheme's sum or mean over ``group``.

        The method ``GradientSync`` calls for each sparse gradient
        (:class:`thrifty.sync.SparseSync`), so a scheme object can be given to
        it directly.
        """
        return run_sync(self, tensor, group, average=average, output=output, check=check)


def run_sync(
    scheme: SparseScheme | None,
    tensor: Tensor,
    group: dist.ProcessGroup | None,
    *,
    average: bool,
    output: Output,
    check: bool,
    error: Exception | None = None,
) -> Tensor:
    """Check every rank's input together, sum with ``scheme``, average, convert back.

    ``error`` is a mistake in this rank's own settings found before any
    collective (an unknown scheme name; a bad ``output`` is found here): with
    ``check`` it is raised on every rank, as a :class:`SparseSyncError`, after
    the collective check, so that no rank is left waiting; without it, only here.
    """
    if error is None and output not in OUTPUTS:
        error = ValueError(f"output must be 'sparse' or 'dense', got {output!r}")
    key = scheme.key() if scheme is not None and error is None else (0, 0, 0)
    if check:
        try:
            check_inputs(tensor, group, key, scheme_error=error is not None)
        except SparseSyncError as exc:
            if error is not None:
                raise SparseSyncError(f"{exc} (on this rank: {error})") from error
            raise
    elif error is not None:
        raise error
    if scheme is None:
        raise ValueError("run_sync needs a scheme when no error is given")

    rows = SparseRows.from_sparse(tensor)
    _, n = group_rank_and_size(group)
    if n == 1 or rows.num_rows * rows.row_numel == 0:  # nothing to send; never alias the input
        reduced: Reduced = rows.like(rows.indices.clone(), rows.values.clone())
    else:
        reduced = scheme.reduce(rows, group)
    if isinstance(reduced, Tensor):  # a dense [num_rows, row_numel] sum
        dense = reduced / n if average else reduced
        if output == "dense":
            return dense.reshape(rows.shape)
        return rows_from_dense(dense, rows).to_sparse()
    summed = reduced.like(reduced.indices, reduced.values / n if average else reduced.values)
    if output == "dense":
        return summed.to_dense_rows().reshape(rows.shape)
    return summed.to_sparse()
