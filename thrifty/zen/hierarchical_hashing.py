"""Hierarchical hashing (Zen's Algorithm 1), vectorised, and the imbalance it achieves.

The problem: split a rank's non-zero indices into ``n`` per-owner lists, where
the owner is ``h0(idx)``, without sorting and without losing an index. Zen's
GPU kernel gives every owner a table of ``r1`` *parallel* slots plus ``r2``
*serial* slots:

1. every index tries up to ``k`` probe slots ``h_i(idx) mod r1`` in its owner's
   parallel area and takes the first empty one;
2. writes race; each writer reads its slot back and, if another index won,
   moves on to its next probe (the read-after-write check the public clone
   lacks, which is how it drops indices);
3. an index whose ``k`` probes all fail is appended to its owner's serial area
   (a per-owner counter);
4. each owner's list is the occupied slots of its table.

Here one "round" of the kernel is one vectorised scatter over all pending
indices; torch keeps exactly one of several writes to a slot, as the GPU
does. Empty slots hold ``-1`` (never 0: index 0 is a real index). The table
stores the *local position* of the entry, so values are gathered without a
search. If the serial area would overflow, it grows to fit (the clone writes
past its end); :attr:`HashedPartition.serial_grown` says when that happened.

The result is, as sets, exactly the sort-based partition by ``h0``; only the
order inside an owner's list differs. On a CPU ``argsort`` by owner is as fast
and simpler, which is why :class:`thrifty.zen.schemes.BalancedParallelism`
uses it by default. Balance itself comes from ``h0`` (Theorem 2), measured
by :func:`imbalance_ratio`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from thrifty.zen.owner_hash import DEFAULT_SEED, OwnerHash, keyed_hash32

__all__ = [
    "HashedPartition",
    "h0_imbalance",
    "hierarchical_hash_partition",
    "imbalance_ratio",
    "partition_by_owner",
]

_EMPTY = -1


def imbalance_ratio(counts: Sequence[int] | Tensor) -> float:
    """``n * max / total`` over ``n`` owners' counts: 1.0 is perfect balance, ``n`` the worst.

    With per-owner counts of one rank's indices this is Zen's Push imbalance;
    with per-owner counts of the union it is the Pull imbalance.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    total = float(counts.sum())
    if counts.numel() == 0 or total == 0:
        return 1.0
    return counts.numel() * float(counts.max()) / total


def h0_imbalance(
    index_sets: Sequence[Tensor], num_rows: int, seed: int = DEFAULT_SEED
) -> tuple[float, float]:
    """Zen's (Push, Pull) imbalance ratios of ``h0`` on ``n`` ranks' index sets.

    Push: the worst rank's ``n * max_j |I_i^j| / |I_i|``; Pull: the same over
    the union. Theorem 2 bounds both by ``1 + O(sqrt(n log n / size))``.
    """
    n = len(index_sets)
    if n == 0:
        return 1.0, 1.0
    h0 = OwnerHash.cached(num_rows, n, seed)
    push = max(
        (imbalance_ratio(torch.bincount(h0.owner(s), minlength=n)) for s in index_sets),
        default=1.0,
    )
    union = torch.unique(torch.cat(list(index_sets)))
    pull = imbalance_ratio(torch.bincount(h0.owner(union.long()), minlength=n))
    return push, pull


@dataclass(frozen=True)
class HashedPartition:
    """Per-owner lists of local positions (into the partitioned index tensor)."""

    parts: list[Tensor]
    parallel_slots: int
    serial_slots: int
    serial_entries: int
    serial_grown: bool

    @property
    def sizes(self) -> list[int]:
        return [p.numel() for p in self.parts]

    @property
    def imbalance(self) -> float:
        """The Push imbalance ratio of this partition."""
        return imbalance_ratio(self.sizes)

    @property
    def serial_share(self) -> float:
        """Fraction of entries that missed all ``k`` probes and went to a serial area."""
        total = sum(self.sizes)
        return self.serial_entries / total if total else 0.0


def partition_by_owner(owners: Tensor, num_owners: int) -> list[Tensor]:
    """The simple partition: local positions of each owner's entries, ascending."""
    order = torch.argsort(owners, stable=True)
    counts = torch.bincount(owners, minlength=num_owners).tolist()
    return list(torch.split(order, counts))


def hierarchical_hash_partition(
    indices: Tensor,
    owners: Tensor,
    num_owners: int,
    *,
    probes: int = 3,
    slack: float = 2.0,
    serial_fraction: float = 0.1,
    seed: int = DEFAULT_SEED,
) -> HashedPartition:
    """Algorithm 1 over unique ``indices`` whose owners ``h0(idx)`` are ``owners``.

    Args:
        probes: ``k``, the probe hashes tried in the parallel area (the paper uses 3).
        slack: parallel slots in total per entry (the paper's ``r1 = 2|G|d``),
            spread evenly over the owners.
        serial_fraction: serial slots per owner as a fraction of its parallel
            slots (the paper's ``r2 = r1/10``).
        seed: keys of the probe hashes ``h_1..h_k``; unlike h0 they may differ by rank.
    """
    if probes < 0:
        raise ValueError(f"probes must be >= 0, got {probes}")
    if slack <= 0 or serial_fraction < 0:
        raise ValueError(f"need slack > 0 and serial_fraction >= 0, got {slack}, {serial_fraction}")
    nnz = indices.numel()
    r1 = max(1, math.ceil(slack * nnz / num_owners))
    r2 = max(1, math.ceil(serial_fraction * r1))
    table = torch.full((num_owners, r1 + r2), _EMPTY, dtype=torch.int64)
    flat = table.view(-1)
    width = r1 + r2
    rng = random.Random(seed)
    pending = torch.arange(nnz, dtype=torch.int64)
    for _ in range(probes):
        if pending.numel() == 0:
            break
        key = rng.getrandbits(64)
        slot = owners[pending] * width + keyed_hash32(indices[pending], key) % r1
        free = flat[slot] == _EMPTY
        candidates, target = pending[free], slot[free]
        flat[target] = candidates  # racing writes: exactly one per slot survives
        won = flat[target] == candidates  # read-after-write: losers probe again
        pending = torch.cat([pending[~free], candidates[~won]])

    serial_entries = pending.numel()
    grown = False
    if serial_entries:
        pending_owner = owners[pending]
        order = torch.argsort(pending_owner, stable=True)
        pending, pending_owner = pending[order], pending_owner[order]
        counts = torch.bincount(pending_owner, minlength=num_owners)
        starts = torch.cumsum(counts, 0) - counts
        offset = torch.arange(serial_entries) - starts[pending_owner]
        need = int(counts.max())
        if need > r2:  # the serial counter would run past the area: grow, never drop
            grown = True
            wider = torch.full((num_owners, r1 + need), _EMPTY, dtype=torch.int64)
            wider[:, :r1] = table[:, :r1]
            table, r2 = wider, need
        table[pending_owner, r1 + offset] = pending

    parts = [row[row != _EMPTY] for row in table]
    return HashedPartition(parts, r1, r2, serial_entries, grown)
