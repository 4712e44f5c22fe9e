"""Stochastic quantizers: QSGD and TernGrad. Both are unbiased.

Random rounding is reproducible under ``torch.manual_seed``. On CPU each call
draws one seed from torch's default generator and streams uniform numbers
from a NumPy PCG64 generator seeded with it (torch's CPU generator, a
Mersenne twister, costs ~3 clones of the input on its own); the uniforms are
``j * 2**-24`` for a uniform 24-bit ``j``, the same grid as ``torch.rand``. On
other devices ``torch.rand_like`` draws them. Either way the CPU kernels walk
the input in cached chunks (see :mod:`thrifty.compressors.bitpacking`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import ClassVar

import numpy as np
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
from thrifty.compressors.bitpacking import (
    STREAM_CHUNK,
    pack_codes,
    packed_nbytes,
    stream_chunks,
    unpack_codes,
)

UNIFORM_BITS = 24
"""Resolution of the CPU uniforms: ``j * 2**-24``, as ``torch.rand`` for float32."""

_NORM_SAFE_RANGE = (1e-14, 1e14)
"""max|x| for which a float32 sum of squares neither overflows (numel < 2**31) nor
loses more than rounding to subnormal squares."""


def _safe_divisor(scale: Tensor) -> Tensor:
    """``scale`` where positive, else 1 (an all-zero tensor then quantises to zeros)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _max_magnitude(values: Tensor) -> Tensor:
    """``max |x|`` as a (1,) float32 tensor (0 when empty), by one reduction without temporaries."""
    if values.numel() == 0:
        return torch.zeros(1, dtype=torch.float32, device=values.device)
    low, high = torch.aminmax(values)
    return torch.maximum(-low, high).reshape(1)


def _l2_norm(values: Tensor) -> Tensor:
    """``||x||_2`` as a (1,) float32 tensor, safe from overflow and underflow.

    A float32 sum of squares overflows for ``|x| > ~1e19`` and loses the squares
    of ``|x| < ~1e-23``. The norm is taken in float32 directly when ``max |x|``
    lies in :data:`_NORM_SAFE_RANGE` (two reductions, no temporary), else as
    ``max|x| * ||x / max|x| ||``. Off the CPU always the latter: choosing would
    need a host synchronisation.
    """
    top = _max_magnitude(values)
    if values.device.type != "cpu":
        return top * torch.linalg.vector_norm(values / _safe_divisor(top))
    peak = float(top)
    if peak == 0.0:
        return top
    low, high = _NORM_SAFE_RANGE
    if low <= peak <= high:
        return torch.linalg.vector_norm(values).reshape(1)
    return (top * torch.linalg.vector_norm(values / top)).reshape(1)


def _uniform_stream() -> np.random.Generator:
    """A PCG64 generator seeded by one draw from torch's default CPU generator."""
    seed = int(torch.randint(0, 2**62, (1,)))
    return np.random.Generator(np.random.PCG64(seed))


def _uniform_chunk(stream: np.random.Generator, size: int) -> Tensor:
    """``size`` uniform 24-bit integers ``j`` (the uniform is ``j * 2**-24``) as int32."""
    raw = stream.bit_generator.random_raw((size + 1) // 2)
    words = torch.from_numpy(raw.view(np.int32)[:size])
    return words.bitwise_and_((1 << UNIFORM_BITS) - 1)


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
        norm = _l2_norm(values)
        if values.device.type != "cpu":
            scaled = values.abs() / _safe_divisor(norm) * self.levels
            lower = scaled.floor()
            level = lower + (torch.rand_like(scaled) < scaled - lower).to(scaled.dtype)
            level = level.clamp_(max=self.levels).to(torch.int32)
            signed = torch.where(values < 0, -level, level)
            return pack_codes(signed + self.levels, self.code_bits), norm
        return self._compress_cpu(values, _safe_divisor(norm)), norm

    def _compress_cpu(self, values: Tensor, divisor: Tensor) -> Tensor:
        """The CPU kernel: per cached chunk, the same rounding as the device path."""
        numel, bits = values.numel(), self.code_bits
        out = torch.empty(packed_nbytes(numel, bits), dtype=torch.uint8)
        stream = _uniform_stream()
        size = min(numel, STREAM_CHUNK)
        scaled, level = torch.empty(size), torch.empty(size)
        up = torch.empty(size, dtype=torch.bool)
        for start, end in stream_chunks(numel):
            m = end - start
            chunk, s, lv, u = values[start:end], scaled[:m], level[:m], up[:m]
            torch.abs(chunk, out=s).div_(divisor).mul_(self.levels)
            torch.floor(s, out=lv)
            # rand < scaled - lower, with rand = j * 2**-24: j < (scaled - lower) * 2**24.
            s.sub_(lv).mul_(float(1 << UNIFORM_BITS))
            torch.lt(_uniform_chunk(stream, m), s, out=u)
            lv.add_(u).clamp_(max=self.levels)
            torch.copysign(lv, chunk, out=lv).add_(self.levels)  # -0 (from x = -0) is 0
            first, last = start * bits // 8, packed_nbytes(end, bits)
            if bits == 8:
                out[first:last].copy_(lv)
            else:
                out[first:last] = pack_codes(lv.to(torch.int32), bits)
        return out

    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        packed, norm = payload
        step = norm / self.levels
        if packed.device.type != "cpu":
            signed = unpack_codes(packed, numel, self.code_bits) - self.levels
            return signed.to(torch.float32) * step
        bits = self.code_bits
        out = torch.empty(numel, dtype=torch.float32)
        for start, end in stream_chunks(numel):
            first, last = start * bits // 8, packed_nbytes(end, bits)
            codes = (
                packed[first:last]
                if bits == 8
                else unpack_codes(packed[first:last], end - start, bits)
            )
            # (code - s) is exact in float32, then one product: as the device path.
            out[start:end].copy_(codes).sub_(self.levels).mul_(step)
        return out


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
        return _max_magnitude(values)

    def _compress(self, flat: Tensor, key: Hashable) -> tuple[Tensor, ...]:
        values = as_float32(flat)
        scale = _max_magnitude(values)
        if values.device.type != "cpu":
            ternary = self._ternarize(values, scale)
            return pack_codes(ternary.to(torch.int32) + 1, self.code_bits), scale
        return self._compress_cpu(values, _safe_divisor(scale)), scale

    @staticmethod
    def _compress_cpu(values: Tensor, divisor: Tensor) -> Tensor:
        """The CPU kernel: per cached chunk, the code ``t + 1`` as two bit planes.

        Code 2 (``t = +1``) is bits ``10``, 1 (``t = 0``) ``01``, 0 (``t = -1``)
        ``00``: the high bit is "kept and positive", the low bit "dropped", and
        ``np.packbits`` of the interleaved planes is the 2-bit packing.
        """
        numel = values.numel()
        out = np.empty(packed_nbytes(numel, 2), dtype=np.uint8)
        stream = _uniform_stream()
        size = min(numel, STREAM_CHUNK)
        threshold, magnitude = torch.empty(size), torch.empty(size)
        keep = torch.empty(size, dtype=torch.bool)
        planes = torch.empty(size, 2, dtype=torch.bool)
        for start, end in stream_chunks(numel):
            m = end - start
            chunk, t, a, k, p = (
                values[start:end],
                threshold[:m],
                magnitude[:m],
                keep[:m],
                planes[:m],
            )
            # rand * s < |x| with rand = j * 2**-24, rounded as the device path rounds it.
            t.copy_(_uniform_chunk(stream, m)).mul_(2.0**-UNIFORM_BITS).mul_(divisor)
            torch.lt(t, torch.abs(chunk, out=a), out=k)
            torch.logical_and(k, torch.gt(chunk, 0, out=p[:, 0]), out=p[:, 0])
            torch.logical_not(k, out=p[:, 1])
            out[start // 4 : packed_nbytes(end, 2)] = np.packbits(p.numpy())
        return torch.from_numpy(out)

    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        packed, scale = payload
        if packed.device.type != "cpu":
            ternary = unpack_codes(packed, numel, self.code_bits) - 1
            return ternary.to(torch.float32) * scale
        out = torch.empty(numel, dtype=torch.float32)
        array = packed.numpy()
        for start, end in stream_chunks(numel):
            planes = np.unpackbits(
                array[start // 4 : packed_nbytes(end, 2)], count=2 * (end - start)
            )
            codes = torch.from_numpy(planes).view(-1, 2)
            # code = 2 * high + low, then (code - 1) * s: exact integers, one product.
            out[start:end].copy_(codes[:, 0]).mul_(2.0).add_(codes[:, 1]).sub_(1.0).mul_(scale)
        return out

    def _allreduce_rounds(self, flat: Tensor, key: Hashable) -> AllreduceRounds:
        values = as_float32(flat)
        shared_scale = yield Reduce(self._max_magnitude(values), "max")
        ternary_sum = yield Reduce(self._ternarize(values, shared_scale), "sum")
        return ternary_sum.to(torch.float32) * shared_scale.to(torch.float32)
