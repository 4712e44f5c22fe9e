"""Bit packing of small unsigned codes into uint8 tensors, and streaming 1-bit kernels.

Bits are packed most-significant first: element ``i`` of a 1-bit stream lands in
byte ``i // 8`` at bit ``7 - i % 8``. A stream of ``n`` codes of ``b`` bits each
takes ``ceil(n * b / 8)`` bytes; the tail of the last byte is zero.

Two implementations of the same format:

* on CPU, NumPy's ``packbits``/``unpackbits`` (SIMD, one pass) over views of the
  tensors' memory, and kernels that walk the input in chunks of
  :data:`STREAM_CHUNK` elements so that every temporary stays in cache: one
  pass over the input and one over the output, as close to memory bandwidth as a
  ``torch.clone`` (issue 20);
* on any other device, shifts and sums over reshaped views (no Python loop
  over elements).

Both give bit-identical results; ``tests/test_fast_kernels.py`` checks them
against a plain reference.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

MAX_CODE_BITS = 16

STREAM_CHUNK = 1 << 16
"""Elements per chunk of the streaming CPU kernels: a multiple of 8 (chunks end on
byte boundaries for every code width), and small enough that a chunk's float32
temporaries (256 KiB each) stay in the L2 cache."""


def packed_nbytes(n: int, bits_per_code: int = 1) -> int:
    """Bytes needed for ``n`` codes of ``bits_per_code`` bits."""
    return (n * bits_per_code + 7) // 8


def stream_chunks(n: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of consecutive chunks of at most :data:`STREAM_CHUNK` elements."""
    for start in range(0, n, STREAM_CHUNK):
        yield start, min(start + STREAM_CHUNK, n)


def _on_cpu(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


def _byte_shifts(device: torch.device) -> Tensor:
    return torch.arange(7, -1, -1, dtype=torch.uint8, device=device)


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a flat bool/0-1 tensor of ``n`` entries into ``ceil(n / 8)`` uint8 bytes."""
    n = bits.numel()
    if _on_cpu(bits):
        flat = bits.reshape(-1)
        if flat.dtype != torch.bool:
            flat = flat != 0
        return torch.from_numpy(np.packbits(flat.numpy()))
    padded = torch.zeros(packed_nbytes(n) * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits.reshape(-1)
    weighted = padded.view(-1, 8) << _byte_shifts(bits.device)
    return weighted.sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a bool tensor.

    ``packed`` may have leading batch dimensions ``(..., nbytes)``; the result
    then has shape ``(..., n)``.
    """
    if _on_cpu(packed) and packed.dtype == torch.uint8:
        array = np.ascontiguousarray(packed.numpy())
        return torch.from_numpy(np.unpackbits(array, axis=-1, count=n)).view(torch.bool)
    bits = (packed.unsqueeze(-1) >> _byte_shifts(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :n].bool()


def pack_nonnegative(values: Tensor) -> Tensor:
    """``pack_bits(values >= 0)`` for a flat tensor, without the ``numel``-byte mask.

    On CPU the comparison runs chunk by chunk into one cached mask, each chunk
    packed straight into the output: one read of ``values``.
    """
    if not _on_cpu(values):
        return pack_bits(values >= 0)
    n = values.numel()
    out = np.empty(packed_nbytes(n), dtype=np.uint8)
    mask = torch.empty(min(n, STREAM_CHUNK), dtype=torch.bool)
    for start, end in stream_chunks(n):
        chunk_mask = mask[: end - start]
        torch.ge(values[start:end], 0, out=chunk_mask)
        out[start // 8 : packed_nbytes(end)] = np.packbits(chunk_mask.numpy())
    return torch.from_numpy(out)


def expand_bits(packed: Tensor, n: int, low: Tensor | float, high: Tensor | float) -> Tensor:
    """Flat float32 of ``n`` entries: ``high`` where the bit is set, ``low`` elsewhere.

    Exactly ``torch.where(unpack_bits(packed, n), high, low)``. On CPU each chunk is
    unpacked into cache and written once into the output as the float32 bit
    patterns ``low ^ (mask & (low ^ high))``: integer operations, so the values are
    ``low`` and ``high`` bit for bit.
    """
    low_t = torch.as_tensor(low, dtype=torch.float32).reshape(())
    high_t = torch.as_tensor(high, dtype=torch.float32).reshape(())
    if not _on_cpu(packed, low_t, high_t):
        device = packed.device
        return torch.where(unpack_bits(packed, n), high_t.to(device), low_t.to(device))
    low_bits = int(low_t.view(torch.int32))
    flip = low_bits ^ int(high_t.view(torch.int32))
    out = torch.empty(n, dtype=torch.float32)
    out_bits = out.view(torch.int32)
    array = packed.numpy()
    for start, end in stream_chunks(n):
        ones = torch.from_numpy(
            np.unpackbits(array[start // 8 : packed_nbytes(end)], count=end - start)
        )
        ones.neg_()  # 1 -> 0xFF, i.e. -1 as int8: sign-extends to an all-ones int32 mask
        chunk = out_bits[start:end]
        chunk.copy_(ones.view(torch.int8))
        chunk.bitwise_and_(flip).bitwise_xor_(low_bits)
    return out


def pack_codes(codes: Tensor, bits_per_code: int) -> Tensor:
    """Pack unsigned integer codes in ``[0, 2**bits_per_code)`` into uint8 bytes.

    8-bit codes are stored as they are; 1, 2 and 4-bit codes share bytes
    (``8 // bits_per_code`` per byte); any other width up to 16 bits is split into
    bit planes and bit-packed, so no bit is wasted except at the very end.
    """
    _check_width(bits_per_code)
    codes = codes.reshape(-1)
    n = codes.numel()
    device = codes.device
    if bits_per_code == 8:
        return codes.to(torch.uint8)
    if 8 % bits_per_code == 0:
        per_byte = 8 // bits_per_code
        padded = torch.zeros(
            packed_nbytes(n, bits_per_code) * per_byte, dtype=torch.uint8, device=device
        )
        padded[:n] = codes
        shifts = torch.arange(per_byte - 1, -1, -1, dtype=torch.uint8, device=device)
        return (padded.view(-1, per_byte) << (shifts * bits_per_code)).sum(dim=1, dtype=torch.uint8)
    planes = torch.arange(bits_per_code - 1, -1, -1, dtype=torch.int32, device=device)
    bits = (codes.to(torch.int32).unsqueeze(1) >> planes) & 1
    return pack_bits(bits.reshape(-1))


def unpack_codes(packed: Tensor, n: int, bits_per_code: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``n`` codes as an int32 tensor.

    ``packed`` may have leading batch dimensions ``(..., nbytes)``.
    """
    _check_width(bits_per_code)
    batch = packed.shape[:-1]
    device = packed.device
    if bits_per_code == 8:
        return packed[..., :n].to(torch.int32)
    if 8 % bits_per_code == 0:
        per_byte = 8 // bits_per_code
        shifts = torch.arange(per_byte - 1, -1, -1, dtype=torch.uint8, device=device)
        mask = (1 << bits_per_code) - 1
        codes = (packed.unsqueeze(-1) >> (shifts * bits_per_code)) & mask
        return codes.reshape(*batch, packed.shape[-1] * per_byte)[..., :n].to(torch.int32)
    bits = unpack_bits(packed, n * bits_per_code).to(torch.int32)
    planes = torch.arange(bits_per_code - 1, -1, -1, dtype=torch.int32, device=device)
    return (bits.reshape(*batch, n, bits_per_code) << planes).sum(dim=-1, dtype=torch.int32)


def _check_width(bits_per_code: int) -> None:
    if not 1 <= bits_per_code <= MAX_CODE_BITS:
        raise ValueError(f"bits_per_code must be in [1, {MAX_CODE_BITS}], got {bits_per_code}")
