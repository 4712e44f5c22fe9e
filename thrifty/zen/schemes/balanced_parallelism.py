"""Zen's Balanced Parallelism (BP): hash-partitioned Push, owner sums, hash-bitmap Pull.

Zen (Wang et al., OSDI'25, "ZEN: Empowering Distributed Training with
Sparsity-driven Data Synchronization") shows that the communication-optimal
scheme is BP or HC (Theorem 1) and that BP wins in practice. Steps:

1. ``h0`` (shared by all ranks, :class:`~thrifty.zen.owner_hash.OwnerHash`)
   gives every non-zero index an owner and a position in that owner's list;
   a random permutation spreads even heavily skewed indices evenly (Theorem 2);
2. Push: each rank sends owner ``p`` the (position, value row) pairs it owns,
   one all-to-all(v); positions instead of indices let the owner work in its
   own smaller index space;
3. each owner sums what it received (``index_add`` over the unique positions);
4. Pull: each owner all-gathers its sum, as COO or as a hash bitmap, whichever
   is smaller (:mod:`thrifty.zen.hash_bitmap`); every rank maps positions back
   to indices with ``h0``'s inverse.

Per rank that is ``((n-1)/n) [d M (s_i + s_v) + gamma d M s_v + min(gamma d M s_i, M/8)]``
bytes, balanced to within the hash's imbalance ratio. Lossless: every index,
0 included, goes to exactly one owner and comes back once.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist

from thrifty.comm import collectives
from thrifty.zen.hash_bitmap import PullFormat, decode_pull, encode_pull
from thrifty.zen.hierarchical_hashing import hierarchical_hash_partition, partition_by_owner
from thrifty.zen.owner_hash import DEFAULT_SEED, OwnerHash
from thrifty.zen.schemes.base import Reduced, SparseScheme, group_rank_and_size
from thrifty.zen.sparse_rows import (
    SparseRows,
    decode_coo,
    encode_coo,
    sum_duplicate_rows,
    wire_index_dtype,
)

__all__ = ["BalancedParallelism"]

_PULL_FORMATS: tuple[PullFormat, ...] = ("auto", "coo", "bitmap")
_PARTITIONERS = ("sort", "hierarchical")


class BalancedParallelism(SparseScheme):
    """Zen's BP scheme.

    Args:
        seed: key of ``h0``; must be the same on every rank (checked).
            :func:`thrifty.zen.sync.agree_seed` draws one on rank 0 for all.
        pull_format: ``"auto"`` (per owner, the smaller of COO and hash bitmap),
            or force ``"coo"`` / ``"bitmap"`` (for measurements).
        partitioner: ``"sort"`` (argsort by owner) or ``"hierarchical"``
            (Zen's Algorithm 1, :mod:`thrifty.zen.hierarchical_hashing`); both
            give the same partition, the second avoids a sort on a GPU.
    """

    name: ClassVar[str] = "zen"
    code: ClassVar[int] = 5

    def __init__(
        self,
        seed: int = DEFAULT_SEED,
        pull_format: PullFormat = "auto",
        partitioner: str = "sort",
    ) -> None:
        if not 0 <= seed < 2**62:
            raise ValueError(f"seed must be in [0, 2**62), got {seed}")
        if pull_format not in _PULL_FORMATS:
            raise ValueError(f"pull_format must be one of {_PULL_FORMATS}, got {pull_format!r}")
        if partitioner not in _PARTITIONERS:
            raise ValueError(f"partitioner must be one of {_PARTITIONERS}, got {partitioner!r}")
        self.seed = seed
        self.pull_format: PullFormat = pull_format
        self.partitioner = partitioner

    def key(self) -> tuple[int, int, int]:
        return (self.code, self.seed, _PULL_FORMATS.index(self.pull_format))

    def reduce(self, rows: SparseRows, group: dist.ProcessGroup | None = None) -> Reduced:
        rank, n = group_rank_and_size(group)
        h0 = OwnerHash.cached(rows.num_rows, n, self.seed)
        index_dtype = wire_index_dtype(rows.num_rows)
        owners, positions = h0.split(rows.indices)

        # Push: owner p gets the (position, values) pairs it is responsible for.
        if self.partitioner == "hierarchical":
            parts = hierarchical_hash_partition(
                rows.indices, owners, n, seed=self.seed + rank
            ).parts
        else:
            parts = partition_by_owner(owners, n)
        chunks = [encode_coo(positions[p], rows.values[p], index_dtype) for p in parts]
        received = collectives.all_to_all_v(chunks, group=group)
        pushed = [decode_coo(b, rows.row_numel, rows.dtype, index_dtype) for b in received]  # type: ignore[union-attr]
        owned_positions, owned_sums = sum_duplicate_rows(
            torch.cat([p[0] for p in pushed]), torch.cat([p[1] for p in pushed])
        )

        # Pull: every owner's sum to every rank, COO or hash bitmap.
        message = encode_pull(
            owned_positions, owned_sums, h0.list_size(rank), index_dtype, self.pull_format
        )
        gathered = collectives.all_gather_v(message, group=group)
        indices, values = [], []
        for owner, buffer in enumerate(gathered):  # type: ignore[arg-type]
            size = h0.list_size(owner)
            pos, vals = decode_pull(
                buffer, size, rows.row_numel, rows.dtype, index_dtype, self.pull_format
            )
            indices.append(h0.rows(owner, pos))
            values.append(vals)
        all_indices, order = torch.sort(torch.cat(indices))
        return rows.like(all_indices, torch.cat(values)[order])
