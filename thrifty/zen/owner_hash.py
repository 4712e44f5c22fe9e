"""h0, the hash every rank shares: which owner (server) is responsible for an index.

Zen's balance comes from h0 alone (Theorem 2): each owner receives about
``1/n`` of every rank's indices and of their union, whatever the skew. We make
h0 a keyed *permutation* ``pi`` of the index space ``[0, M)`` and set

    owner(idx) = pi(idx) mod n,        position(idx) = pi(idx) div n.

Why a permutation: the owner's index list (the hash bitmap's order) is then
``I_p = [pi^-1(j*n + p) for j = 0, 1, ...]``, so a bit position maps to an
index by arithmetic, with no table of ``M`` entries on every rank, and the
``n`` lists have sizes that differ by at most one.

``pi`` is a 4-round Feistel network over the smallest even number of bits that
covers ``M``, with *cycle walking* (re-encrypt while the result is ``>= M``)
to stay inside ``[0, M)``; the domain is less than ``4M``, so a walk takes
under 4 steps on average. The round function is a 32-bit multiply-xorshift
mixer computed in int64 with products below ``2^59``, so nothing overflows and
every rank, CPU or GPU, gets the same bits. Seeds must agree across ranks;
:func:`thrifty.zen.sync.sync_sparse` checks that they do.

Evaluating the network costs some 50 elementwise ops per index, as much as
the transfer itself on a fast link, so for index spaces up to
``TABLE_LIMIT`` rows (every embedding table we train) ``pi`` and its inverse
are computed once for all of ``[0, M)`` and kept as two int32 tables; each
later lookup is one gather (a flat gradient of a few million elements too).
Larger spaces are hashed on the fly.
"""

from __future__ import annotations

import random
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["DEFAULT_SEED", "TABLE_LIMIT", "OwnerHash", "keyed_hash32", "mix32"]

DEFAULT_SEED = 0x5EED_2E4
_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # odd, < 2^27: a 32-bit value times it stays below 2^59
_ROUNDS = 4
TABLE_LIMIT = 1 << 24
"""Largest index space whose permutation is tabulated (two int32 tables, 128 MiB at most).

Hashing on the fly costs far more than the gathers: a DGC-sparsified 5.3M
vector with 53K non-zeros spent 0.2 s per sync in the Feistel walk (2 ranks)."""


def mix32(x: Tensor) -> Tensor:
    """Avalanche 32-bit values (int64 tensor, each in ``[0, 2^32)``) into 32-bit hashes."""
    x = (((x >> 16) ^ x) * _MIX) & _M32
    x = (((x >> 16) ^ x) * _MIX) & _M32
    return (x >> 16) ^ x


def keyed_hash32(x: Tensor, key: int) -> Tensor:
    """A 32-bit hash of non-negative int64 values under a 64-bit key."""
    low = (x & _M32) ^ (key & _M32)
    high = (x >> 32) ^ ((key >> 32) & _M32)
    return mix32(mix32(low) ^ high)


def _round_keys(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(32) for _ in range(count)]


class OwnerHash:
    """The shared owner map h0 for ``num_rows`` indices and ``num_owners`` owners.

    Example::

        h0 = OwnerHash(num_rows=10, num_owners=3, seed=7)
        owner, position = h0.split(torch.arange(10))
        assert torch.equal(h0.rows(0, h0.owner_list_positions(0)).sort().values,
                           torch.arange(10)[owner == 0])
    """

    def __init__(
        self,
        num_rows: int,
        num_owners: int,
        seed: int = DEFAULT_SEED,
        table_limit: int = TABLE_LIMIT,
    ) -> None:
        if num_rows < 0:
            raise ValueError(f"num_rows must be >= 0, got {num_rows}")
        if num_owners < 1:
            raise ValueError(f"num_owners must be >= 1, got {num_owners}")
        self.num_rows = num_rows
        self.num_owners = num_owners
        self.seed = seed
        self.table_limit = table_limit
        bits = max(2, (max(num_rows - 1, 1)).bit_length())
        self._half = (bits + 1) // 2
        self._half_mask = (1 << self._half) - 1
        self._keys = _round_keys(seed, _ROUNDS)
        self._forward: Tensor | None = None
        self._inverse: Tensor | None = None

    @staticmethod
    @lru_cache(maxsize=8)
    def cached(num_rows: int, num_owners: int, seed: int = DEFAULT_SEED) -> OwnerHash:
        """One instance per (size, owners, seed): construction is cheap, but reuse is free."""
        return OwnerHash(num_rows, num_owners, seed)

    # ------------------------------------------------------------------ the permutation

    def _feistel(self, x: Tensor, inverse: bool) -> Tensor:
        left, right = x >> self._half, x & self._half_mask
        keys = reversed(self._keys) if inverse else self._keys
        for key in keys:  # halves are below 2^31, so one 32-bit mix per round suffices
            if inverse:
                left, right = right ^ (mix32(left ^ key) & self._half_mask), left
            else:
                left, right = right, left ^ (mix32(right ^ key) & self._half_mask)
        return (left << self._half) | right

    def _walk(self, x: Tensor, inverse: bool) -> Tensor:
        out = self._feistel(x, inverse)
        outside = (out >= self.num_rows).nonzero().squeeze(1)
        while outside.numel():
            stepped = self._feistel(out[outside], inverse)
            out[outside] = stepped
            outside = outside[stepped >= self.num_rows]
        return out

    def _tabulate(self) -> bool:
        if self.num_rows > self.table_limit:
            return False
        if self._forward is None:
            forward = self._walk(torch.arange(self.num_rows, dtype=torch.int64), inverse=False)
            inverse = torch.empty(self.num_rows, dtype=torch.int32)
            inverse[forward] = torch.arange(self.num_rows, dtype=torch.int32)
            self._forward, self._inverse = forward.to(torch.int32), inverse
        return True

    def permute(self, indices: Tensor) -> Tensor:
        """``pi(idx)`` for int64 indices in ``[0, num_rows)``."""
        if self._tabulate():
            assert self._forward is not None
            return self._forward[indices].long()
        return self._walk(indices.long(), inverse=False)

    def unpermute(self, codes: Tensor) -> Tensor:
        """``pi^-1(code)`` for int64 codes in ``[0, num_rows)``."""
        if self._tabulate():
            assert self._inverse is not None
            return self._inverse[codes].long()
        return self._walk(codes.long(), inverse=True)

    # ------------------------------------------------------------------ owners and lists

    def owner(self, indices: Tensor) -> Tensor:
        """h0: the owner of each index."""
        return self.permute(indices) % self.num_owners

    def split(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """(owner, position in that owner's list) of each index."""
        code = self.permute(indices)
        return code % self.num_owners, code // self.num_owners

    def list_size(self, owner: int) -> int:
        """``|I_p|``: how many indices of ``[0, num_rows)`` owner ``p`` is responsible for."""
        return max(0, -(-(self.num_rows - owner) // self.num_owners))

    def rows(self, owner: int, positions: Tensor) -> Tensor:
        """The indices at ``positions`` of owner ``p``'s list."""
        return self.unpermute(positions.long() * self.num_owners + owner)

    def owner_list_positions(self, owner: int) -> Tensor:
        """All positions of owner ``p``'s list, in list order (``0 .. |I_p|-1``)."""
        return torch.arange(self.list_size(owner), dtype=torch.int64)

    def owner_list(self, owner: int) -> Tensor:
        """``I_p`` in bitmap order: the index behind each bit of owner ``p``'s hash bitmap."""
        return self.rows(owner, self.owner_list_positions(owner))
