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
from thrifty.compressors.bitpacking import pack_bits, packed_nbytes, unpack_bits


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
        return (pack_bits(self._signal(flat, key) >= 0),)

    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        return _signs_from_bits(unpack_bits(payload[0], numel))

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
            momentum = self.momentum * previous + (1.0 - self.momentum) * values
        self._momenta[key] = momentum
        return momentum

    def state_keys(self) -> list[Hashable]:
        return list(self._momenta)

    def export_state(self, key: Hashable = None) -> dict[str, Tensor]:
        return {"momentum": self._momenta[key]} if key in self._momenta else {}

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
        scale = values.abs().sum().reshape(1) / max(values.numel(), 1)
        return pack_bits(values >= 0), scale

    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        packed, scale = payload
        return _signs_from_bits(unpack_bits(packed, numel)) * scale


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
        positive = values >= 0
        count_pos = positive.sum()
        count_neg = values.numel() - count_pos
        sum_pos = torch.where(positive, values, 0.0).sum()
        sum_neg = torch.where(positive, 0.0, values).sum()
        means = torch.stack(
            [sum_neg / count_neg.clamp(min=1), sum_pos / count_pos.clamp(min=1)]
        ).to(torch.float32)
        return pack_bits(positive), means

    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        packed, means = payload
        return torch.where(unpack_bits(packed, numel), means[1], means[0])
