"""Vectorised bit packing of small unsigned codes into uint8 tensors.

Bits are packed most-significant first: element ``i`` of a 1-bit stream lands in
byte ``i // 8`` at bit ``7 - i % 8``. A stream of ``n`` codes of ``b`` bits each
takes ``ceil(n * b / 8)`` bytes; the tail of the last byte is zero. All work is
done with shifts and sums over reshaped views, never a Python loop over elements,
so it runs on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_CODE_BITS = 16


def packed_nbytes(n: int, bits_per_code: int = 1) -> int:
    """Bytes needed for ``n`` codes of ``bits_per_code`` bits."""
    return (n * bits_per_code + 7) // 8


def _byte_shifts(device: torch.device) -> Tensor:
    return torch.arange(7, -1, -1, dtype=torch.uint8, device=device)


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a flat bool/0-1 tensor of ``n`` entries into ``ceil(n / 8)`` uint8 bytes."""
    n = bits.numel()
    padded = torch.zeros(packed_nbytes(n) * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits.reshape(-1)
    weighted = padded.view(-1, 8) << _byte_shifts(bits.device)
    return weighted.sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a bool tensor.

    ``packed`` may have leading batch dimensions ``(..., nbytes)``; the result
    then has shape ``(..., n)``.
    """
    bits = (packed.unsqueeze(-1) >> _byte_shifts(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :n].bool()


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
