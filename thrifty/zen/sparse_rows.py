"""A sparse tensor seen as rows: one linear index per non-zero row, one value row each.

Every scheme works on this one shape of data, whatever the caller passed:

* a 1-D sparse vector is ``num_rows = numel`` rows of one value;
* an ``nn.Embedding(sparse=True)`` gradient (sparse dim 1, dense dim 1) is
  ``num_embeddings`` rows of ``embedding_dim`` values;
* a tensor with several sparse dims (a sparse 2-D matrix) has its sparse
  coordinates flattened row-major into one linear index.

The linear index is what the schemes hash, partition and send, so they never
care about the original shape. Construction coalesces: duplicate coordinates
of an uncoalesced input are summed first, as ``torch`` would.

On the wire a COO entry is an index (int32 while the index space fits, else
int64) followed by its value row; :func:`encode_coo` / :func:`decode_coo`
pack both into one byte buffer with :func:`thrifty.comm.collectives.pack`, so
one collective carries indices and values together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from thrifty.comm import collectives

__all__ = [
    "SUPPORTED_DTYPES",
    "SparseRows",
    "decode_coo",
    "encode_coo",
    "rows_from_dense",
    "sum_duplicate_rows",
    "wire_index_dtype",
]

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
)
"""Value dtypes the schemes sum (gradients)."""

_INT32_LIMIT = 2**31 - 1


def wire_index_dtype(num_rows: int) -> torch.dtype:
    """int32 while every index fits (4 bytes instead of 8 per entry), else int64."""
    return torch.int32 if num_rows <= _INT32_LIMIT else torch.int64


@dataclass(frozen=True)
class SparseRows:
    """A coalesced sparse tensor as (sorted unique linear row indices, value rows).

    ``values`` has shape ``[nnz, row_numel]``; ``shape`` and ``sparse_dim`` are
    the original tensor's, kept to rebuild it.
    """

    indices: Tensor
    values: Tensor
    shape: tuple[int, ...]
    sparse_dim: int

    @property
    def num_rows(self) -> int:
        """Size of the linear index space (the product of the sparse dims)."""
        return math.prod(self.shape[: self.sparse_dim])

    @property
    def row_numel(self) -> int:
        """Values per index (the product of the dense dims; 1 for a sparse vector)."""
        return math.prod(self.shape[self.sparse_dim :])

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @classmethod
    def from_sparse(cls, tensor: Tensor) -> SparseRows:
        """Coalesce a sparse COO tensor (summing duplicates) and flatten its sparse dims."""
        t = tensor.detach().coalesce()
        shape = tuple(t.shape)
        sparse_dim = t.sparse_dim()
        indices = _linearize(t.indices(), shape[:sparse_dim])
        values = t.values().reshape(indices.numel(), math.prod(shape[sparse_dim:]))
        return cls(indices, values, shape, sparse_dim)

    def like(self, indices: Tensor, values: Tensor) -> SparseRows:
        """Rows of the same tensor shape with other entries (indices sorted and unique)."""
        return SparseRows(
            indices, values.reshape(indices.numel(), self.row_numel), self.shape, self.sparse_dim
        )

    def to_sparse(self) -> Tensor:
        """The coalesced sparse COO tensor of the original shape."""
        coords = _unravel(self.indices, self.shape[: self.sparse_dim])
        values = self.values.reshape(self.nnz, *self.shape[self.sparse_dim :])
        return torch.sparse_coo_tensor(
            coords, values, self.shape, is_coalesced=True, check_invariants=False
        )

    def to_dense_rows(self) -> Tensor:
        """A dense ``[num_rows, row_numel]`` tensor with the rows filled in."""
        dense = torch.zeros(self.num_rows, self.row_numel, dtype=self.dtype)
        dense[self.indices] = self.values
        return dense


def rows_from_dense(dense_rows: Tensor, like: SparseRows) -> SparseRows:
    """The rows of a dense ``[num_rows, row_numel]`` tensor that hold a non-zero value.

    A dense result has lost which rows were structurally present, so all-zero
    rows are left out.
    """
    present = (dense_rows != 0).any(dim=1).nonzero().squeeze(1)
    return like.like(present, dense_rows[present])


def sum_duplicate_rows(indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Sum value rows that share an index; returns sorted unique indices and their sums."""
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    sums = torch.zeros(unique.numel(), values.shape[1], dtype=values.dtype)
    sums.index_add_(0, inverse, values)
    return unique, sums


def encode_coo(indices: Tensor, values: Tensor, index_dtype: torch.dtype) -> Tensor:
    """One uint8 buffer: all indices (as ``index_dtype``), then all value rows."""
    return collectives.pack([indices.to(index_dtype), values])


def decode_coo(
    buffer: Tensor, row_numel: int, value_dtype: torch.dtype, index_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`encode_coo`; the entry count follows from the buffer size."""
    entry_bytes = index_dtype.itemsize + row_numel * value_dtype.itemsize
    count, rest = divmod(buffer.numel(), entry_bytes)
    if rest:
        raise RuntimeError(
            f"COO buffer of {buffer.numel()} bytes is not a whole number of "
            f"{entry_bytes}-byte entries; ranks disagree on the tensor layout"
        )
    layout = collectives.Layout(((index_dtype, (count,)), (value_dtype, (count, row_numel))))
    indices, values = collectives.unpack(buffer, layout)
    return indices.long(), values


def _linearize(coords: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """Row-major linear index of ``[len(sizes), nnz]`` coordinates (sorted stays sorted)."""
    linear = torch.zeros(coords.shape[1], dtype=torch.int64)
    for dim, size in enumerate(sizes):
        linear = linear * size + coords[dim]
    return linear


def _unravel(linear: Tensor, sizes: tuple[int, ...]) -> Tensor:
    coords = torch.empty(len(sizes), linear.numel(), dtype=torch.int64)
    rest = linear.clone()
    for dim in range(len(sizes) - 1, -1, -1):
        coords[dim] = rest % sizes[dim]
        rest = rest // sizes[dim]
    return coords
