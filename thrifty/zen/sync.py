"""``sync_sparse``: sum (or average) a sparse tensor over ranks with a chosen scheme.

One entry point for all five schemes, so that callers (GradientSync, the
benchmark, the demo) switch schemes by name::

    grad = embedding.weight.grad                   # sparse COO, any duplicates
    synced = sync_sparse(grad, scheme="zen")       # averaged like DDP, sparse
    dense = sync_sparse(grad, scheme="agsparse", output="dense")

What it does, whatever the scheme:

1. check every rank's input together (:mod:`thrifty.zen.validation`): one small
   all-gather, then the same clear :class:`SparseSyncError` on every rank for a
   dense tensor, an unsupported dtype, NaN/Inf values, or shapes, dtypes and
   scheme settings that differ across ranks; nobody is left hanging;
2. coalesce (duplicates summed) and view the tensor as rows
   (:class:`~thrifty.zen.sparse_rows.SparseRows`);
3. sum over ranks with the scheme; every rank gets the bitwise-same result;
4. divide by the world size when ``average`` (DDP's convention), and return a
   coalesced sparse COO tensor or a dense one.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from thrifty.comm import collectives
from thrifty.zen.schemes import (
    AllGatherSparse,
    BalancedParallelism,
    ContiguousBlockParallelism,
    DenseAllReduce,
    HierarchicalCentralization,
    SparseScheme,
)
from thrifty.zen.schemes.base import group_rank_and_size
from thrifty.zen.selection import AutoScheme
from thrifty.zen.sparse_rows import SparseRows, rows_from_dense
from thrifty.zen.validation import SparseSyncError, check_inputs

__all__ = ["SCHEMES", "SchemeName", "agree_seed", "make_scheme", "sync_sparse"]

SchemeName = Literal["zen", "dense", "agsparse", "sparcml", "omnireduce", "auto"]
SCHEMES: dict[str, type[SparseScheme]] = {
    cls.name: cls
    for cls in (
        BalancedParallelism,
        DenseAllReduce,
        AllGatherSparse,
        HierarchicalCentralization,
        ContiguousBlockParallelism,
        AutoScheme,
    )
}
"""Scheme classes by the name :func:`sync_sparse` accepts."""

Output = Literal["sparse", "dense"]


def make_scheme(name: str, **options: object) -> SparseScheme:
    """A scheme by name, with its options (e.g. ``make_scheme("zen", seed=7)``)."""
    if name not in SCHEMES:
        raise ValueError(f"unknown sparse scheme {name!r}; expected one of {sorted(SCHEMES)}")
    return SCHEMES[name](**options)  # type: ignore[arg-type]


def agree_seed(group: dist.ProcessGroup | None = None) -> int:
    """A fresh random hash seed, the same on every rank (rank 0's draw), for ``h0``."""
    mine = torch.tensor([random.SystemRandom().getrandbits(62)], dtype=torch.int64)
    return int(collectives.all_gather(mine, group=group)[0])  # type: ignore[index]


def sync_sparse(
    tensor: Tensor,
    scheme: SchemeName | str | SparseScheme = "zen",
    group: dist.ProcessGroup | None = None,
    *,
    average: bool = True,
    output: Output = "sparse",
    check: bool = True,
) -> Tensor:
    """Sum (``average=False``) or average a sparse COO tensor over the ranks of ``group``.

    Args:
        tensor: a sparse COO tensor of the same shape and dtype on every rank;
            1-D, an ``nn.Embedding(sparse=True)`` gradient (sparse rows), or any
            number of sparse dims. Uncoalesced duplicates are summed.
        scheme: a name from :data:`SCHEMES` or a scheme object (keep an
            :class:`~thrifty.zen.selection.AutoScheme` object to profile once).
        output: ``"sparse"`` (coalesced COO) or ``"dense"``.
        check: run the collective input check (one all-gather of
            ``METADATA_WORDS`` int64 per rank). Without it bad input can hang.

    Raises:
        SparseSyncError: bad input on any rank; raised on every rank.
    """
    local_error: Exception | None = None
    resolved: SparseScheme | None = None
    try:
        resolved = scheme if isinstance(scheme, SparseScheme) else make_scheme(scheme)
        if output not in ("sparse", "dense"):
            raise ValueError(f"output must be 'sparse' or 'dense', got {output!r}")
    except (TypeError, ValueError) as exc:
        local_error = exc
    key = resolved.key() if resolved is not None and local_error is None else (0, 0, 0)
    if check:
        try:
            check_inputs(tensor, group, key, scheme_error=local_error is not None)
        except SparseSyncError as exc:
            if local_error is not None:
                raise SparseSyncError(f"{exc} (on this rank: {local_error})") from local_error
            raise
    elif local_error is not None:
        raise local_error
    assert resolved is not None

    rows = SparseRows.from_sparse(tensor)
    _, n = group_rank_and_size(group)
    if n == 1 or rows.num_rows * rows.row_numel == 0:  # nothing to send; never alias the input
        reduced: SparseRows | Tensor = rows.like(rows.indices.clone(), rows.values.clone())
    else:
        reduced = resolved.reduce(rows, group)
    if isinstance(reduced, Tensor):  # a dense [num_rows, row_numel] sum
        dense = reduced / n if average else reduced
        if output == "dense":
            return dense.reshape(rows.shape)
        return rows_from_dense(dense, rows).to_sparse()
    summed = reduced.like(reduced.indices, reduced.values / n if average else reduced.values)
    if output == "dense":
        return summed.to_dense_rows().reshape(rows.shape)
    return summed.to_sparse()
