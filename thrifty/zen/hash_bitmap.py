"""The hash bitmap: how an owner sends its aggregated partition back (Zen's Pull).

Owner ``p`` is responsible for the index list ``I_p`` (see
:class:`thrifty.zen.owner_hash.OwnerHash`), which every rank can compute. After
the Push it holds the entries at some positions of that list. It can send them

* as COO: ``u`` positions (``s_i`` bytes each) and ``u`` value rows, or
* as a hash bitmap: one bit per element of ``I_p`` (``ceil(|I_p|/8)`` bytes),
  then the ``u`` value rows in list order.

Summed over the ``n`` owners the bitmaps cost ``M/8`` bytes, independent of
``n``; COO costs ``u * s_i``. The owner picks whichever is smaller:

    bitmap  iff  ceil(|I_p| / 8) < u * s_i        (ties go to COO).

No flag byte is needed: every rank learns each owner's byte count from the
all-gather's size exchange and knows ``|I_p|``, and the rule makes the count
unambiguous. If a buffer of ``S`` bytes were both a COO message
(``S = u_c (s_i + r)``, ``B >= u_c s_i``) and a bitmap message
(``S = B + u_b r``, ``B < u_b s_i``), then ``u_b r = S - B <= u_c r`` gives
``u_b <= u_c`` and ``B < u_b s_i <= u_c s_i <= B``, a contradiction.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from thrifty.comm import collectives

__all__ = [
    "PullFormat",
    "bitmap_bytes",
    "decode_pull",
    "encode_pull",
    "expected_pull_bytes",
    "pack_bits",
    "pull_uses_bitmap",
    "unpack_bits",
]

PullFormat = Literal["auto", "coo", "bitmap"]
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def bitmap_bytes(list_size: int) -> int:
    return -(-list_size // 8)


def pack_bits(positions: Tensor, list_size: int) -> Tensor:
    """A little-endian bitmap of ``list_size`` bits with the given (distinct) positions set.

    Work is one pass over the positions plus one over the bytes (not the bits):
    distinct powers of two add up to their OR.
    """
    positions = positions.long()
    packed = torch.zeros(bitmap_bytes(list_size), dtype=torch.int32)
    packed.index_add_(0, positions >> 3, (1 << (positions & 7)).to(torch.int32))
    return packed.to(torch.uint8)


def unpack_bits(bitmap: Tensor, list_size: int) -> Tensor:
    """The set positions of a bitmap made by :func:`pack_bits`, ascending.

    When most bytes are zero (a pulled bitmap at low density) only the
    non-zero bytes are expanded to bits: 1M bits with 40K set take 3 ms
    instead of 5; when most bytes hold a bit, expanding all is cheaper.
    """
    byte_index = bitmap.nonzero().squeeze(1)
    if 2 * byte_index.numel() > bitmap.numel():
        bits = (bitmap.unsqueeze(1) >> _BIT_SHIFTS) & 1
        return bits.reshape(-1)[:list_size].nonzero().squeeze(1)
    bits = (bitmap[byte_index].unsqueeze(1) >> _BIT_SHIFTS) & 1
    flat = bits.reshape(-1).nonzero().squeeze(1)  # bit b of the i-th non-zero byte: 8i + b
    positions = byte_index[flat >> 3] * 8 + (flat & 7)
    return positions[positions < list_size]


def pull_uses_bitmap(
    count: int, list_size: int, index_bytes: int, fmt: PullFormat = "auto"
) -> bool:
    """Whether an owner with ``count`` entries of a ``list_size`` list sends a bitmap."""
    if fmt == "auto":
        return bitmap_bytes(list_size) < count * index_bytes
    return fmt == "bitmap"


def encode_pull(
    positions: Tensor,
    values: Tensor,
    list_size: int,
    index_dtype: torch.dtype,
    fmt: PullFormat = "auto",
) -> Tensor:
    """An owner's Pull message; ``positions`` ascending, ``values`` in the same order."""
    if pull_uses_bitmap(positions.numel(), list_size, index_dtype.itemsize, fmt):
        return collectives.pack([pack_bits(positions, list_size), values])
    return collectives.pack([positions.to(index_dtype), values])


def decode_pull(
    buffer: Tensor,
    list_size: int,
    row_numel: int,
    value_dtype: torch.dtype,
    index_dtype: torch.dtype,
    fmt: PullFormat = "auto",
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`encode_pull`: (ascending positions, value rows).

    The format follows from the buffer size (see the module docstring) unless
    ``fmt`` forces one, which every rank then uses alike.
    """
    row_bytes = row_numel * value_dtype.itemsize
    index_bytes = index_dtype.itemsize
    size = buffer.numel()
    coo_count, coo_rest = divmod(size, index_bytes + row_bytes)
    is_coo = coo_rest == 0 and not pull_uses_bitmap(coo_count, list_size, index_bytes, fmt)
    if is_coo:
        layout = collectives.Layout(
            ((index_dtype, (coo_count,)), (value_dtype, (coo_count, row_numel)))
        )
        positions, values = collectives.unpack(buffer, layout)
        return positions.long(), values
    head = bitmap_bytes(list_size)
    count, rest = divmod(size - head, row_bytes) if row_bytes else (0, size - head)
    if size < head or rest or not pull_uses_bitmap(count, list_size, index_bytes, fmt):
        raise RuntimeError(
            f"a Pull message of {size} bytes is neither COO nor a hash bitmap for a list of "
            f"{list_size} with {row_bytes}-byte rows; ranks disagree on the tensor layout"
        )
    layout = collectives.Layout(((torch.uint8, (head,)), (value_dtype, (count, row_numel))))
    bitmap, values = collectives.unpack(buffer, layout)
    positions = unpack_bits(bitmap, list_size)
    if positions.numel() != count:
        raise RuntimeError(f"hash bitmap has {positions.numel()} bits set for {count} value rows")
    return positions, values


def expected_pull_bytes(count: int, list_size: int, index_bytes: int, row_bytes: int) -> int:
    """Bytes of an owner's Pull message under the automatic format choice."""
    if pull_uses_bitmap(count, list_size, index_bytes):
        return bitmap_bytes(list_size) + count * row_bytes
    return count * (index_bytes + row_bytes)
