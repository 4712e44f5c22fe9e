"""``sync_sparse``: sum (or average) a sparse tensor over ranks with a chosen scheme.

One entry point for all five schemes, so that callers (the benchmark, the
demo) switch schemes by name; ``GradientSync`` calls the same path through
each scheme object's ``sync`` method::

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

(Steps 1-4 are :func:`thrifty.zen.schemes.base.run_sync`.)
"""

from __future__ import annotations

import random
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from thrifty.comm import collectives
from thrifty.compressors.registry import check_options
from thrifty.zen.schemes import (
    AllGatherSparse,
    BalancedParallelism,
    ContiguousBlockParallelism,
    DenseAllReduce,
    HierarchicalCentralization,
    SparseScheme,
)
from thrifty.zen.schemes.base import Output, run_sync
from thrifty.zen.selection import AutoScheme

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
"""Scheme classes by the name :func:`sync_sparse` accepts (and ``GradientSync`` once
``thrifty.zen`` is imported: it registers each class as a factory)."""


def make_scheme(name: str, **options: object) -> SparseScheme:
    """A scheme by name, with its options (e.g. ``make_scheme("zen", seed=7)``)."""
    if name not in SCHEMES:
        raise ValueError(f"unknown sparse scheme {name!r}; expected one of {sorted(SCHEMES)}")
    check_options(name, SCHEMES[name], options)
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
    error: Exception | None = None
    resolved: SparseScheme | None = None
    try:
        resolved = scheme if isinstance(scheme, SparseScheme) else make_scheme(scheme)
    except (TypeError, ValueError) as exc:  # raised on every rank by run_sync
        error = exc
    return run_sync(
        resolved, tensor, group, average=average, output=output, check=check, error=error
    )
