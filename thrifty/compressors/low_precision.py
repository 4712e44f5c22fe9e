"""Casts: no compression (float32), FP16 and BF16.

All three are all-reduce compatible: the payload is the tensor itself in a
narrower dtype, and the sum of payloads is the payload of the sum.

Overflow: FP16 saturates to +-Inf beyond 65504, and an all-reduce sums in the
payload dtype. The engine therefore divides each gradient by the world size
*before* compressing (gradient pre-division, as in Horovod's
``gradient_predivide_factor`` and PyTorch PRs #57410 and #59522), so neither
the cast nor the sum overflows. BF16 has float32's range but only 8 mantissa
bits; the same pre-division keeps the sum's rounding comparable to the inputs'.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import ClassVar

import torch
from torch import Tensor

from thrifty.compressors.base import Compressor, TensorSpec


class _CastCompressor(Compressor):
    """Sends the tensor cast to ``wire_dtype``: one payload tensor of shape (numel,)."""

    wire_dtype: ClassVar[torch.dtype]
    allreduce_compatible: ClassVar[bool] = True

    @property
    def bits_per_element(self) -> float:
        return float(self.wire_dtype.itemsize * 8)

    def payload_spec(self, numel: int) -> tuple[TensorSpec, ...]:
        return (TensorSpec((numel,), self.wire_dtype),)

    def _compress(self, flat: Tensor, key: Hashable) -> tuple[Tensor, ...]:
        # copy=True: the payload may be all-reduced in place; it must not alias the gradient.
        return (flat.to(self.wire_dtype, copy=True),)

    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        return payload[0].to(torch.float32)


class NoCompression(_CastCompressor):
    """Sends float32 as it is: 32 bits per element, ``4 * numel`` bytes.

    The baseline, and the way the engine sends a group it decides not to
    compress through the same code path as the others.
    """

    name: ClassVar[str] = "none"
    wire_dtype: ClassVar[torch.dtype] = torch.float32


class FP16(_CastCompressor):
    """Sends IEEE half precision: 16 bits per element, ``2 * numel`` bytes.

    Relative rounding error at most 2**-11 in the normal range; values beyond
    +-65504 become +-Inf (pre-divide by the world size, see the module docstring).
    """

    name: ClassVar[str] = "fp16"
    wire_dtype: ClassVar[torch.dtype] = torch.float16


class BF16(_CastCompressor):
    """Sends bfloat16: 16 bits per element, ``2 * numel`` bytes.

    float32's exponent range (no overflow), relative rounding error at most 2**-8.
    """

    name: ClassVar[str] = "bf16"
    wire_dtype: ClassVar[torch.dtype] = torch.bfloat16
