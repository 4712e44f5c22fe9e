"""PowerSGD: low-rank gradient compression by one step of power iteration."""

from __future__ import annotations

import logging
import math
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
    derive_seed,
    stable_key_hash,
)

logger = logging.getLogger(__name__)


def _orthonormalize(p: Tensor) -> Tensor:
    """Orthonormal basis of the columns of ``p`` (reduced QR; ``r`` is small)."""
    return torch.linalg.qr(p, mode="reduced").Q


class PowerSGD(Compressor):
    """PowerSGD (Vogels et al., NeurIPS 2019), rank ``r``, warm-started.

    The flat tensor of ``numel`` elements is viewed as an ``n x m`` matrix ``M``:
    ``shape`` if given (``n * m >= numel``), otherwise the near-square
    ``n = ceil(sqrt(numel))``, ``m = ceil(numel / n)``, zero-padded at the end
    (padding is less than ``n`` elements). The shape depends only on ``numel``,
    never on the gradient's original shape, because the engine hands over flat,
    possibly fused groups. With ``r = min(rank, n, m)``:

    All-reduce path, two sequential all-reduces (:meth:`allreduce_rounds`):

    1. ``P = M Q`` with ``Q`` (``m x r``) warm-started from the previous step
       (initially standard normal from ``(seed, crc32(repr(key)))``, identical on
       every rank); all-reduce ``P`` (sum).
    2. ``P_hat = orthonormalize(P)``; ``Q = M^T P_hat``; all-reduce ``Q`` (sum).
    3. Return ``P_hat Q^T``, the rank-``r`` approximation of ``sum_i M_i``.

    ``r * (n + m)`` float32 per rank, ``4 * r * (n + m)`` bytes in all. Error
    feedback is advised; the paper keeps ``e_i = M_i - mean approximation``,
    i.e. ``memory.update(key, M_i, result / world_size)``.

    All-gather path (:meth:`compress`): the same power step on the local ``M``
    with a local warm start; payload ``(P_hat (n*r,), Q (m*r,))`` float32, and
    ``decompress = P_hat Q^T``.

    Small tensors are sent raw, float32 ``(numel,)``: when
    ``r * (n + m) * min_compression_rate >= numel``, which covers every tensor
    too small to gain (1-D biases and norms in layer-wise plans, and prime-ish
    sizes with no useful matrix view). Raw tensors are all-reduced once.

    Args:
        rank: ``r``, the approximation rank.
        min_compression_rate: compress only when it shrinks the tensor at least
            this much (PyTorch's ``min_compression_rate``).
        shape: fixed matrix view ``(n, m)`` for every tensor this instance sees.
        warm_start: reuse last step's ``Q`` (else a fresh normal ``Q`` from
            ``(seed, key, step)`` every step).
        seed: seed of the initial ``Q``; must match across ranks.
    """

    name: ClassVar[str] = "powersgd"

    def __init__(
        self,
        rank: int = 1,
        *,
        min_compression_rate: float = 2.0,
        shape: tuple[int, int] | None = None,
        warm_start: bool = True,
        seed: int = 0,
        check_finite: bool = True,
    ) -> None:
        super().__init__(check_finite=check_finite)
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be an int >= 1, got {rank!r}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if min_compression_rate < 1.0:
            raise ValueError(f"min_compression_rate must be >= 1, got {min_compression_rate}")
        if shape is not None and (len(shape) != 2 or min(shape) < 1):
            raise ValueError(f"shape must be two positive ints (n, m), got {shape!r}")
        self.rank = rank
        self.min_compression_rate = min_compression_rate
        self.shape = None if shape is None else (int(shape[0]), int(shape[1]))
        self.warm_start = warm_start
        self.seed = seed
        self._local_q: dict[Hashable, Tensor] = {}
        self._shared_q: dict[Hashable, Tensor] = {}
        self._steps: dict[Hashable, int] = {}

    # ------------------------------------------------------------------ sizes
    def matrix_shape(self, numel: int) -> tuple[int, int]:
        """The ``(n, m)`` matrix view of a tensor of ``numel`` elements."""
        if self.shape is not None:
            n, m = self.shape
            if n * m < numel:
                raise ValueError(
                    f"{self.name}: shape {self.shape} holds {n * m} elements, fewer than "
                    f"numel {numel}"
                )
            return n, m
        if numel == 0:
            return 0, 0
        n = math.isqrt(numel - 1) + 1
        return n, -(-numel // n)

    def effective_rank(self, numel: int) -> int:
        n, m = self.matrix_shape(numel)
        return min(self.rank, n, m)

    def compresses(self, numel: int) -> bool:
        """True when a tensor of ``numel`` elements is low-rank compressed, not sent raw."""
        n, m = self.matrix_shape(numel)
        r = min(self.rank, n, m)
        return numel > 0 and r * (n + m) * self.min_compression_rate < numel

    @property
    def bits_per_element(self) -> float:
        """Bits per element of a 1024 x 1024 matrix (or of ``shape``): ``32 r (n+m) / (n m)``.

        PowerSGD's ratio depends on the matrix shape; use :meth:`payload_nbytes`.
        """
        n, m = self.shape if self.shape is not None else (1024, 1024)
        if not self.compresses(n * m):
            return 32.0
        r = min(self.rank, n, m)
        return 32.0 * r * (n + m) / (n * m)

    def payload_spec(self, numel: int) -> tuple[TensorSpec, ...]:
        if not self.compresses(numel):
            return (TensorSpec((numel,), torch.float32),)
        n, m = self.matrix_shape(numel)
        r = min(self.rank, n, m)
        return TensorSpec((n * r,), torch.float32), TensorSpec((m * r,), torch.float32)

    @property
    def supports_allreduce_rounds(self) -> bool:
        return True

    def allreduce_round_specs(self, numel: int) -> tuple[RoundSpec, ...]:
        return tuple(RoundSpec(spec, "sum") for spec in self.payload_spec(numel))

    # ---------------------------------------------------------------- helpers
    def _matrix(self, values: Tensor) -> Tensor:
        n, m = self.matrix_shape(values.numel())
        padded = torch.zeros(n * m, dtype=torch.float32, device=values.device)
        padded[: values.numel()] = values
        return padded.view(n, m)

    def _query(
        self, store: dict[Hashable, Tensor], key: Hashable, m: int, r: int, device: torch.device
    ) -> Tensor:
        step = self._steps.get(key, 0)
        self._steps[key] = step + 1
        q = store.get(key)
        if self.warm_start and q is not None and q.shape == (m, r):
            # Columns scaled to max |q| = 1: the kept Q carries the gradient's scale and
            # M @ Q would square it (float32 overflows beyond |M| ~ 1e19, underflows below
            # ~1e-23). P's orthonormalisation ignores a positive scale of its columns.
            return (q / q.abs().amax(dim=0).clamp_min(torch.finfo(q.dtype).tiny)).to(device)
        if q is not None and self.warm_start:
            logger.debug("powersgd: tensor %r changed shape; new Q", key)
        parts = (
            (self.seed, stable_key_hash(key))
            if self.warm_start
            else (self.seed, stable_key_hash(key), step)
        )
        # Drawn on the CPU so every rank gets the same Q whatever its device.
        generator = torch.Generator().manual_seed(derive_seed(*parts))
        return torch.randn(m, r, generator=generator).to(device)

    # ---------------------------------------------------------------- paths
    def _compress(self, flat: Tensor, key: Hashable) -> tuple[Tensor, ...]:
        numel = flat.numel()
        if not self.compresses(numel):
            return (as_float32(flat, copy=True),)
        matrix = self._matrix(as_float32(flat))
        n, m = matrix.shape
        r = min(self.rank, n, m)
        p_hat = _orthonormalize(matrix @ self._query(self._local_q, key, m, r, flat.device))
        q = matrix.T @ p_hat
        self._local_q[key] = q
        return p_hat.reshape(-1), q.reshape(-1)

    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        if not self.compresses(numel):
            return payload[0].clone()
        n, m = self.matrix_shape(numel)
        r = min(self.rank, n, m)
        p_hat, q = payload
        return (p_hat.view(n, r) @ q.view(m, r).T).reshape(-1)[:numel]

    def _allreduce_rounds(self, flat: Tensor, key: Hashable) -> AllreduceRounds:
        numel = flat.numel()
        if not self.compresses(numel):
            return (yield Reduce(as_float32(flat, copy=True), "sum"))
        matrix = self._matrix(as_float32(flat))
        n, m = matrix.shape
        r = min(self.rank, n, m)
        p = matrix @ self._query(self._shared_q, key, m, r, flat.device)
        p_sum = yield Reduce(p.reshape(-1), "sum")
        p_hat = _orthonormalize(p_sum.view(n, r))
        q_sum = yield Reduce((matrix.T @ p_hat).reshape(-1), "sum")
        q_sum = q_sum.view(m, r)
        self._shared_q[key] = q_sum
        return (p_hat @ q_sum.T).reshape(-1)[:numel]

    def state_keys(self) -> list[Hashable]:
        return list(dict.fromkeys([*self._local_q, *self._shared_q, *self._steps]))

    def export_state(self, key: Hashable = None) -> dict[str, Tensor]:
        state = {}
        if key in self._local_q:
            state["local_q"] = self._local_q[key]
        if key in self._shared_q:
            state["shared_q"] = self._shared_q[key]
        if key in self._steps:
            state["step"] = torch.tensor(self._steps[key], dtype=torch.int64)
        return state

    def import_state(self, key: Hashable, state: dict[str, Tensor]) -> None:
        if "local_q" in state:
            self._local_q[key] = state["local_q"].to(torch.float32, copy=True)
        if "shared_q" in state:
            self._shared_q[key] = state["shared_q"].to(torch.float32, copy=True)
        if "step" in state:
            self._steps[key] = int(state["step"])

    def state_template(self, key: Hashable, numel: int) -> dict[str, Tensor]:
        template = {"step": torch.zeros((), dtype=torch.int64)}
        if self.compresses(numel):
            n, m = self.matrix_shape(numel)
            r = min(self.rank, n, m)
            template["local_q"] = torch.zeros(m, r)
            template["shared_q"] = torch.zeros(m, r)
        return template

    def reset_state(self, key: Hashable = None) -> None:
        for store in (self._local_q, self._shared_q, self._steps):
            if key is None:
                store.clear()
            else:
                store.pop(key, None)
