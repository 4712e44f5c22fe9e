"""Stochastic quantizers: QSGD and TernGrad. Both are unbiased.

Random rounding uses torch's default generator on the input's device, so
``torch.manual_seed`` makes them reproducible.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import ClassVar

import torch
from torch import Tensor

from thrifty.compressors.base import (
    AllreduceRounds,
    Compressor,
    Reduce,
    RoundSpec,
    TensorSpec,
    as_float32,
)
from thrifty.compressors.bitpacking import pack_codes, packed_nbytes, unpack_codes


def _safe_divisor(scale: Tensor) -> Tensor:
    """``scale`` where positive, else 1 (an all-zero tensor then quantises to zeros)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


class QSGD(Compressor):
    """QSGD (Alistarh et al., NeurIPS 2017): stochastic rounding to ``s`` levels.

    For ``v = x / ||x||_2``, each ``|v_i| * s`` is rounded to one of its two
    neighbouring integers ``l`` or ``l + 1`` with probability ``l + 1 - |v_i| s``
    and ``|v_i| s - l``, so ``E[level_i] = |v_i| s`` and
    ``decompress = ||x||_2 * sign(x_i) * level_i / s`` is unbiased. Per-element
    variance is at most ``||x||_2^2 / (4 s^2)``.

    Wire format: each signed level ``sign * level`` in ``[-s, s]`` is sent as the
    code ``sign * level + s`` in ``b = ceil(log2(2s + 1)) = 1 + ceil(log2(s + 1))``
    bits, bit-packed (``ceil(numel * b / 8)`` bytes, uint8), plus the norm as one
    float32. The default ``s = 127`` gives 8 bits per element (one byte, as
    Cupcake's int8); ``s = 1`` gives 2 bits, ``s = 3`` 3 bits. Not all-reduce
    compatible (each rank has its own norm).

    Args:
        levels: ``s``, the number of positive quantisation levels (1 to 32767).
    """

    name: ClassVar[str] = "qsgd"

    def __init__(self, levels: int = 127, *, check_finite: bool = True) -> None:
        super().__init__(check_finite=check_finite)
        if isinstance(levels, bool) or not isinstance(levels, int):
            raise TypeError(f"levels must be an int in [1, 32767], got {levels!r}")
        if not 1 <= levels <= 32767:
            raise ValueError(f"levels must be in [1, 32767], got {levels}")
        self.levels = levels

    @property
    def code_bits(self) -> int:
        """Bits per element on the wire: ``ceil(log2(2 * levels + 1))``."""
        return (2 * self.levels).bit_length()

    @property
    def bits_per_element(self) -> float:
        return float(self.code_bits)

    def payload_spec(self, numel: int) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec((packed_nbytes(numel, self.code_bits),), torch.uint8),
            TensorSpec((1,), torch.float32),
        )

    def _compress(self, flat: Tensor, key: Hashable) -> tuple[Tensor, ...]:
        values = as_float32(flat)
        # Accumulated in float64: in float32 the squares of |x| > ~1e19 overflow (NaN
        # out) and those of |x| < ~1e-23 underflow (norm 0: everything sent as 0).
        norm = torch.linalg.vector_norm(values, dtype=torch.float64).to(torch.float32).reshape(1)
        scaled = values.abs() / _safe_divisor(norm) * self.levels
        lower = scaled.floor()
        level = lower + (torch.rand_like(scaled) < scaled - lower).to(scaled.dtype)
        level = level.clamp_(max=self.levels).to(torch.int32)
        signed = torch.where(values < 0, -level, level)
        return pack_codes(signed + self.levels, self.code_bits), norm

    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        packed, norm = payload
        signed = unpack_codes(packed, numel, self.code_bits) - self.levels
        return signed.to(torch.float32) * (norm / self.levels)


class TernGrad(Compressor):
    """TernGrad (Wen et al., NeurIPS 2017): stochastic ternary gradients.

    With ``s = max_i |x_i|``, sends ``t_i = sign(x_i) * Bernoulli(|x_i| / s)`` in
    {-1, 0, +1}; ``decompress = s * t`` is unbiased, per-element variance
    ``|x_i| (s - |x_i|) <= s^2 / 4``. (The paper's optional 2.5-sigma gradient
    clipping, which makes it biased, is not applied.)

    All-gather path: ``t + 1`` packed in 2 bits per element
    (``ceil(numel / 4)`` bytes) plus ``s`` as one float32.

    All-reduce path with scaler sharing (paper section 3.2): round 1 all-reduces
    ``s`` with ``max`` so that every rank uses the same scale; round 2
    all-reduces the ternary values as int8 (8 bits per element on the wire,
    correct for up to 127 ranks) and the result is ``s * sum(t)``.
    """

    name: ClassVar[str] = "terngrad"
    code_bits: ClassVar[int] = 2

    @property
    def bits_per_element(self) -> float:
        return float(self.code_bits)

    @property
    def supports_allreduce_rounds(self) -> bool:
        return True

    def payload_spec(self, numel: int) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec((packed_nbytes(numel, self.code_bits),), torch.uint8),
            TensorSpec((1,), torch.float32),
        )

    def allreduce_round_specs(self, numel: int) -> tuple[RoundSpec, ...]:
        return (
            RoundSpec(TensorSpec((1,), torch.float32), "max"),
            RoundSpec(TensorSpec((numel,), torch.int8), "sum"),
        )

    @staticmethod
    def _ternarize(values: Tensor, scale: Tensor) -> Tensor:
        """Stochastic ternary values in {-1, 0, 1} as int8."""
        keep = torch.rand_like(values) * _safe_divisor(scale) < values.abs()
        return (torch.sign(values) * keep).to(torch.int8)

    @staticmethod
    def _max_magnitude(values: Tensor) -> Tensor:
        if values.numel() == 0:
            return torch.zeros(1, dtype=torch.float32, device=values.device)
        return values.abs().amax().reshape(1)

    def _compress(self, flat: Tensor, key: Hashable) -> tuple[Tensor, ...]:
        values = as_float32(flat)
        scale = self._max_magnitude(values)
        ternary = self._ternarize(values, scale)
        return pack_codes(ternary.to(torch.int32) + 1, self.code_bits), scale

    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        packed, scale = payload
        ternary = unpack_codes(packed, numel, self.code_bits) - 1
        return ternary.to(torch.float32) * scale

    def _allreduce_rounds(self, flat: Tensor, key: Hashable) -> AllreduceRounds:
        values = as_float32(flat)
        shared_scale = yield Reduce(self._max_magnitude(values), "max")
        ternary_sum = yield Reduce(self._ternarize(values, shared_scale), "sum")
        return ternary_sum.to(torch.float32) * shared_scale.to(torch.float32)
