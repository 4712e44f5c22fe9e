"""One-bit compressors: signSGD, Signum, EF-signSGD and 1-bit SGD (OneBit).

All send one bit per element, packed 8 to a byte (``ceil(numel / 8)`` bytes,
see :mod:`thrifty.compressors.bitpacking`); the bit is 1 for ``x >= 0``, so a
zero travels as +1. EF-signSGD adds one float32 scale, OneBit two float32 means.

Majority vote (signSGD and Signum, Bernstein et al., ICLR 2019): ``aggregate``
returns ``N * sign(sum_i sign_i)`` for ``N`` ranks, i.e. as if every rank had
sent the majority's sign, so the engine's usual division by the world size
yields the vote itself, in {-1, 0, +1} (0 on a tie). The packed bits are not
all-reduce compatible, but the vote is: ``allreduce_rounds`` sums the signs as
int8 (plus one trailing 1 per rank to count the ranks), 8 bits per element on
the wire, correct for up to 127 ranks.
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
    key_name,
)
from thrifty.compressors.bitpacking import (
    STREAM_CHUNK,
    expand_bits,
    pack_nonnegative,
    packed_nbytes,
    stream_chunks,
    unpack_bits,
)


def _signs_from_bits(bits: Tensor) -> Tensor:
    """+1.0 where the bit is set, -1.0 elsewhere."""
    return bits.to(torch.float32) * 2.0 - 1.0


class SignSGD(Compressor):
    """signSGD with majority vote (Bernstein et al., ICML 2018 and ICLR 2019).

    Sends ``sign(x)`` as one bit per element: ``ceil(numel / 8)`` bytes.
    ``decompress`` gives +-1.0 (scale 1: the learning rate carries the
    magnitude); ``aggregate`` is the majority vote described in the module
    docstring. No error feedback in the original method.
    """

    name: ClassVar[str] = "signsgd"
    majority_vote: ClassVar[bool] = True

    @property
    def bits_per_element(self) -> float:
        return 1.0

    @property
    def supports_allreduce_rounds(self) -> bool:
        return True

    def payload_spec(self, numel: int) -> tuple[TensorSpec, ...]:
        return (TensorSpec((packed_nbytes(numel),), torch.uint8),)

    def allreduce_round_specs(self, numel: int) -> tuple[RoundSpec, ...]:
        return (RoundSpec(TensorSpec((numel + 1,), torch.int8), "sum"),)

    def _signal(self, flat: Tensor, key: Hashable) -> Tensor:
        """The tensor whose sign is sent (Signum: the momentum)."""
        return flat

    def _compress(self, flat: Tensor, key: Hashable) -> tuple[Tensor, ...]:
        return (pack_nonnegative(self._signal(flat, key)),)

    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        return expand_bits(payload[0], numel, -1.0, 1.0)

    def _aggregate(self, payloads: list[tuple[Tensor, ...]], numel: int, key: Hashable) -> Tensor:
        if not payloads:
            return torch.zeros(numel, dtype=torch.float32)
        packed = torch.stack([p[0] for p in payloads])
        votes = _signs_from_bits(unpack_bits(packed, numel)).sum(dim=0)
        return torch.sign(votes) * len(payloads)

    def _allreduce_rounds(self, flat: Tensor, key: Hashable) -> AllreduceRounds:
        numel = flat.numel()
        ballot = torch.ones(numel + 1, dtype=torch.int8, device=flat.device)
        ballot[:numel] = torch.where(self._signal(flat, key) >= 0, 1, -1).to(torch.int8)
        counted = yield Reduce(ballot, "sum")
        votes = counted[:numel].to(torch.float32)
        return torch.sign(votes) * counted[numel].to(torch.float32)


class Signum(SignSGD):
    """Signum (Bernstein et al., ICML 2018): the sign of a per-tensor momentum.

    Keeps ``m <- beta * m + (1 - beta) * x`` per key (float32, on the input's
    device) and sends ``sign(m)``: one bit per element, ``ceil(numel / 8)``
    bytes, majority vote as :class:`SignSGD`. The momentum replaces the
    optimizer's, so pair it with plain SGD.

    The momentum is updated in place (on CPU chunk by chunk, fused with the sign
    packing: one pass over memory); :meth:`export_state` returns a copy, so a
    saved state dict never changes under a later step.

    Args:
        momentum: ``beta`` in [0, 1); 0 makes it signSGD.
    """

    name: ClassVar[str] = "signum"

    def __init__(self, momentum: float = 0.9, *, check_finite: bool = True) -> None:
        super().__init__(check_finite=check_finite)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = momentum
        self._momenta: dict[Hashable, Tensor] = {}

    def momentum_buffer(self, key: Hashable = None) -> Tensor | None:
        """The momentum kept for ``key`` (``None`` before its first step)."""
        return self._momenta.get(key)

    def _signal(self, flat: Tensor, key: Hashable) -> Tensor:
        values = as_float32(flat)
        previous = self._momenta.get(key)
        if previous is None:
            momentum = (1.0 - self.momentum) * values
        elif previous.shape != values.shape:
            raise ValueError(
                f"{self.name}: tensor {key_name(key)} changed size from {previous.numel()} to "
                f"{values.numel()}; call reset_state({key!r}) first"
            )
        else:
            # In place, rounded as beta * m + (1 - beta) * x: each product, then the sum.
            scratch = torch.empty(min(values.numel(), STREAM_CHUNK), device=values.device)
            for start, end in stream_chunks(values.numel()):
                fresh = torch.mul(
                    values[start:end], 1.0 - self.momentum, out=scratch[: end - start]
                )
                previous[start:end].mul_(self.momentum).add_(fresh)
            momentum = previous
        self._momenta[key] = momentum
        return momentum

    def state_keys(self) -> list[Hashable]:
        return list(self._momenta)

    def export_state(self, key: Hashable = None) -> dict[str, Tensor]:
        return {"momentum": self._momenta[key].clone()} if key in self._momenta else {}

    def import_state(self, key: Hashable, state: dict[str, Tensor]) -> None:
        if "momentum" in state:
            self._momenta[key] = state["momentum"].reshape(-1).to(torch.float32, copy=True)

    def state_template(self, key: Hashable, numel: int) -> dict[str, Tensor]:
        return {"momentum": torch.zeros(numel)}

    def reset_state(self, key: Hashable = None) -> None:
        if key is None:
            self._momenta.clear()
        else:
            self._momenta.pop(key, None)


class EFSignSGD(Compressor):
    """EF-signSGD (Karimireddy et al., ICML 2019): scaled sign.

    Sends ``(||p||_1 / d) * sign(p)``: one bit per element plus the scale
    ``||p||_1 / d`` (mean magnitude) as one float32, ``ceil(d / 8) + 4`` bytes.
    Here ``p`` is the compensated gradient; the error feedback
    ``e <- p - decompress(...)`` is intrinsic to the method and done by
    :class:`thrifty.compressors.memory.ResidualMemory`. Not all-reduce
    compatible (each rank has its own scale).
    """

    name: ClassVar[str] = "efsignsgd"

    @property
    def bits_per_element(self) -> float:
        return 1.0

    def payload_spec(self, numel: int) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec((packed_nbytes(numel),), torch.uint8),
            TensorSpec((1,), torch.float32),
        )

    def _compress(self, flat: Tensor, key: Hashable) -> tuple[Tensor, ...]:
        values = as_float32(flat)
        # The L1 norm is one reduction; abs().sum() would write a numel-sized temporary.
        l1 = torch.linalg.vector_norm(values, ord=1) if values.numel() else values.new_zeros(())
        scale = l1.reshape(1) / max(values.numel(), 1)
        return pack_nonnegative(values), scale

    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        packed, scale = payload
        # (+-1.0) * scale is exactly +-scale: the same values as the sign times the scale.
        return expand_bits(packed, numel, -scale, scale)


class OneBit(Compressor):
    """1-bit SGD (Seide et al., Interspeech 2014).

    Splits the entries at 0 and sends one bit per element (1 for ``x >= 0``)
    plus the two reconstruction values, the mean of the negative entries and
    the mean of the non-negative ones (float32 ``[mean_neg, mean_pos]``; 0 for
    an empty side): ``ceil(numel / 8) + 8`` bytes. Each entry decompresses to
    the mean of its side, which keeps the sum of each side exact. The paper's
    error feedback is done by :class:`thrifty.compressors.memory.ResidualMemory`.
    Not all-reduce compatible.
    """

    name: ClassVar[str] = "onebit"

    @property
    def bits_per_element(self) -> float:
        return 1.0

    def payload_spec(self, numel: int) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec((packed_nbytes(numel),), torch.uint8),
            TensorSpec((2,), torch.float32),
        )

    def _compress(self, flat: Tensor, key: Hashable) -> tuple[Tensor, ...]:
        values = as_float32(flat)
        packed = pack_nonnegative(values)
        # Two reductions over clamped chunks (cached temporaries), never a full-size mask.
        count_pos = 0
        sum_pos = values.new_zeros((), dtype=torch.float64)
        sum_neg = values.new_zeros((), dtype=torch.float64)
        scratch = torch.empty(min(values.numel(), STREAM_CHUNK), device=values.device)
        for start, end in stream_chunks(values.numel()):
            chunk, side = values[start:end], scratch[: end - start]
            count_pos += int(torch.count_nonzero(torch.ge(chunk, 0)))
            sum_pos += torch.clamp(chunk, min=0.0, out=side).sum(dtype=torch.float64)
            sum_neg += torch.clamp(chunk, max=0.0, out=side).sum(dtype=torch.float64)
        count_neg = values.numel() - count_pos
        means = torch.stack([sum_neg / max(count_neg, 1), sum_pos / max(count_pos, 1)])
        return packed, means.to(torch.float32)

    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        packed, means = payload
        return expand_bits(packed, numel, means[0], means[1])
