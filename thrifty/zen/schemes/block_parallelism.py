"""OmniReduce-style Parallelism: non-zero blocks to contiguous owners, then back to everyone.

OmniReduce (SIGCOMM'21) streams only the non-zero blocks (256 values) of a
tensor to aggregators that each own one contiguous, equal range of it. Here
every rank is an aggregator (Zen's Table 3: Point-to-point, One-shot,
Parallelism, *Imbalanced*):

1. cut the index space into blocks of ``max(1, block_size // row_numel)`` rows
   and the blocks into ``n`` contiguous, equal ranges, one per owner;
2. Push: send every non-zero block (its id and all its values, zeros
   included) to the owner of its range, one all-to-all;
3. owners sum the blocks they receive;
4. Pull: every owner all-gathers its summed non-zero blocks.

Contiguous ranges are what makes it imbalanced: under skew (most non-zeros
in the first rows) one owner receives and sends almost everything, and the
busiest link sets the time. A block is sent whole, so scattered indices cost
up to a block each. The result lists the rows whose sum is non-zero (block
padding says nothing about which rows were present).
"""

from __future__ import annotations

import math
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

__all__ = ["ContiguousBlockParallelism", "rows_per_block"]

OMNIREDUCE_BLOCK_SIZE = 256


def rows_per_block(block_size: int, row_numel: int) -> int:
    """Rows in one block of about ``block_size`` values (at least one row)."""
    return max(1, block_size // max(1, row_numel))


class ContiguousBlockParallelism(SparseScheme):
    """Push non-zero blocks to the owner of their contiguous range; owners sum and all-gather."""

    name: ClassVar[str] = "omnireduce"
    code: ClassVar[int] = 4

    def __init__(self, block_size: int = OMNIREDUCE_BLOCK_SIZE) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size

    def key(self) -> tuple[int, int, int]:
        return (self.code, self.block_size, 0)

    def reduce(self, rows: SparseRows, group: dist.ProcessGroup | None = None) -> Reduced:
        _, n = group_rank_and_size(group)
        per_block = rows_per_block(self.block_size, rows.row_numel)
        num_blocks = math.ceil(rows.num_rows / per_block)
        block_numel = per_block * rows.row_numel
        id_dtype = wire_index_dtype(num_blocks)

        block_ids, blocks = _nonzero_blocks(rows, per_block)
        bounds = torch.tensor([(p * num_blocks) // n for p in range(1, n + 1)], dtype=torch.int64)
        owners = torch.searchsorted(bounds, block_ids, right=True)
        counts = torch.bincount(owners, minlength=n).tolist()  # ids ascend, so owners do
        chunks = [
            encode_coo(ids, vals, id_dtype)
            for ids, vals in zip(block_ids.split(counts), blocks.split(counts), strict=True)
        ]
        received = collectives.all_to_all_v(chunks, group=group)
        parts = [decode_coo(b, block_numel, rows.dtype, id_dtype) for b in received]  # type: ignore[union-attr]
        owned_ids, owned_sums = sum_duplicate_rows(
            torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        )

        gathered = collectives.all_gather_v(
            encode_coo(owned_ids, owned_sums, id_dtype), group=group
        )
        parts = [decode_coo(b, block_numel, rows.dtype, id_dtype) for b in gathered]  # type: ignore[union-attr]
        all_ids = torch.cat([p[0] for p in parts])  # owners in order, ids ascending within
        all_blocks = torch.cat([p[1] for p in parts]).view(-1, rows.row_numel)
        row_ids = (all_ids.unsqueeze(1) * per_block + torch.arange(per_block)).reshape(-1)
        keep = (row_ids < rows.num_rows) & (all_blocks != 0).any(dim=1)
        return rows.like(row_ids[keep], all_blocks[keep])


def _nonzero_blocks(rows: SparseRows, per_block: int) -> tuple[Tensor, Tensor]:
    """Ascending ids of the blocks that hold an entry, and each block's values, zero-padded."""
    block_of = rows.indices // per_block
    block_ids, slot = torch.unique_consecutive(block_of, return_inverse=True)
    blocks = torch.zeros(block_ids.numel(), per_block, rows.row_numel, dtype=rows.dtype)
    blocks[slot, rows.indices % per_block] = rows.values
    return block_ids, blocks.view(block_ids.numel(), per_block * rows.row_numel)
