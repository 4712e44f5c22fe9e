"""Error feedback ("memory"), composable with any compressor.

A memory wraps one compress step per tensor key::

    compensated = memory.compensate(grad, key)        # flat
    payload = compressor.compress(compensated, key)
    sent = compressor.decompress(payload, numel, key)  # what this rank contributed
    memory.update(key, compensated, sent)

State is float32, flat, on the gradient's device, one buffer set per key. A key
whose size changes raises ``ValueError``; call ``reset(key)`` when a plan
changes. ``compensate`` always returns a fresh tensor the caller may keep.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from torch import Tensor

from thrifty.compressors.base import decode_key, encode_key, key_name


def _check_tensor(x: Tensor, key: Hashable, what: str) -> None:
    """``compensate`` takes a gradient tensor; anything else fails here, named."""
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{what}: tensor {key_name(key)} must be a torch.Tensor, got {type(x).__name__}"
        )


def _check_finite_number(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _flat_float32(x: Tensor, key: Hashable, what: str) -> Tensor:
    _check_tensor(x, key, what)
    return x.reshape(-1).to(torch.float32, copy=True)


def _check_size(state: Tensor, numel: int, key: Hashable, what: str) -> None:
    if state.numel() != numel:
        raise ValueError(
            f"{what}: tensor {key_name(key)} changed size from {state.numel()} to {numel}; "
            f"call reset({key!r}) first"
        )


class Memory(ABC):
    """Error feedback: what to compress now, and what to remember for later."""

    @abstractmethod
    def compensate(self, x: Tensor, key: Hashable = None) -> Tensor:
        """The flat tensor to compress for gradient ``x`` of ``key``."""

    @abstractmethod
    def update(self, key: Hashable, compensated: Tensor, sent_decompressed: Tensor) -> None:
        """Record that ``sent_decompressed`` was sent for ``compensated``."""

    def reset(self, key: Hashable = None) -> None:  # noqa: B027 - stateless default
        """Forget the state of ``key`` (of every key when ``None``)."""

    def export_state(self, key: Hashable = None) -> dict[str, Tensor]:
        """The flat per-element state kept for ``key`` (empty when none yet).

        Used to carry error feedback across a change of plan: the engine slices
        it per parameter and re-assembles it for the new groups.
        """
        return {}

    def import_state(self, key: Hashable, state: dict[str, Tensor]) -> None:  # noqa: B027
        """Install state in the format :meth:`export_state` returns."""

    def state_keys(self) -> list[Hashable]:
        """The keys this memory keeps state for."""
        return []

    def state_template(self, key: Hashable, numel: int) -> dict[str, Tensor]:
        """Zeros shaped like every state :meth:`export_state` may return for ``numel`` elements.

        Checkpoint formats that load into a template
        (``torch.distributed.checkpoint``) need each entry before it exists.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Every key's state (tensors, keys as text): ``torch.save`` it with a checkpoint."""
        return {"keys": {encode_key(k): self.export_state(k) for k in self.state_keys()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (state of other keys is dropped)."""
        self.reset()
        for text, tensors in state.get("keys", {}).items():
            self.import_state(decode_key(text), tensors)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_")
        )
        return f"{type(self).__name__}({fields})"


class NoMemory(Memory):
    """No error feedback: compresses the gradient itself (flattened, dtype kept, a copy)."""

    def compensate(self, x: Tensor, key: Hashable = None) -> Tensor:
        _check_tensor(x, key, "NoMemory")
        return x.reshape(-1).clone()

    def update(self, key: Hashable, compensated: Tensor, sent_decompressed: Tensor) -> None:
        return None


class ResidualMemory(Memory):
    """Residual error feedback (Seide et al. 2014; Karimireddy et al., ICML 2019).

    ``compensate``: ``p = beta * e + gamma * g`` (``e = 0`` at first).
    ``update``: ``e <- p - sent``, exactly what was not sent. With
    ``beta = gamma = 1`` the sum of everything sent plus the final residual
    equals the sum of all gradients. Cupcake uses ``beta = 0.9`` for
    EF-signSGD, QSGD and OneBit, which forgets old error geometrically.

    Args:
        beta: decay of the residual.
        gamma: weight of the new gradient.
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0) -> None:
        _check_finite_number(beta, "beta")
        _check_finite_number(gamma, "gamma")
        self.beta = beta
        self.gamma = gamma
        self._residuals: dict[Hashable, Tensor] = {}

    def residual(self, key: Hashable = None) -> Tensor | None:
        """The residual ``e`` kept for ``key`` (``None`` before its first update)."""
        return self._residuals.get(key)

    def compensate(self, x: Tensor, key: Hashable = None) -> Tensor:
        grad = _flat_float32(x, key, "ResidualMemory")
        if self.gamma != 1.0:
            grad.mul_(self.gamma)
        residual = self._residuals.get(key)
        if residual is None:
            return grad
        _check_size(residual, grad.numel(), key, "ResidualMemory")
        return grad.add_(residual, alpha=self.beta)

    def update(self, key: Hashable, compensated: Tensor, sent_decompressed: Tensor) -> None:
        sent = sent_decompressed.reshape(-1).to(torch.float32)
        self._residuals[key] = compensated.reshape(-1).to(torch.float32) - sent

    def reset(self, key: Hashable = None) -> None:
        if key is None:
            self._residuals.clear()
        else:
            self._residuals.pop(key, None)

    def export_state(self, key: Hashable = None) -> dict[str, Tensor]:
        residual = self._residuals.get(key)
        return {} if residual is None else {"residual": residual}

    def import_state(self, key: Hashable, state: dict[str, Tensor]) -> None:
        if "residual" in state:
            self._residuals[key] = state["residual"].reshape(-1).to(torch.float32, copy=True)

    def state_keys(self) -> list[Hashable]:
        return list(self._residuals)

    def state_template(self, key: Hashable, numel: int) -> dict[str, Tensor]:
        return {"residual": torch.zeros(numel)}


class DGCMemory(Memory):
    """DGC's momentum correction and momentum-factor masking (Lin et al., ICLR 2018).

    Per key, a momentum ``u`` and an accumulated velocity ``v``:

    1. Local gradient clipping (optional): scale ``g`` so that ``||g||_2 <=
       gradient_clipping``. The paper clips each rank's gradient to the global
       threshold times ``N^{-1/2}``; pass that per-rank value.
    2. Momentum correction: ``u <- m u + g`` then ``v <- v + u``; with Nesterov
       ``u <- m (u + g)`` then ``v <- v + u + g``. ``compensate`` returns ``v``.
    3. After sending: ``v <- v - sent`` (zero where a sparsifier sent the exact
       value, the residual elsewhere) and momentum-factor masking ``u <- u * (sent
       == 0)``: elements count as sent where their decompressed value is non-zero.

    The momentum moves into the compressor, so pair it with plain SGD (no
    optimizer momentum). With ``momentum=0`` it is residual error feedback.

    Args:
        momentum: ``m``.
        nesterov: use the Nesterov form.
        gradient_clipping: per-rank L2-norm bound for ``g``, or ``None``.
    """

    def __init__(
        self, momentum: float = 0.9, nesterov: bool = False, gradient_clipping: float | None = None
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if gradient_clipping is not None and not 0 < gradient_clipping < math.inf:
            raise ValueError(
                f"gradient_clipping must be a positive number, got {gradient_clipping!r}"
            )
        self.momentum = momentum
        self.nesterov = nesterov
        self.gradient_clipping = gradient_clipping
        self._momenta: dict[Hashable, Tensor] = {}
        self._velocities: dict[Hashable, Tensor] = {}

    def momentum_buffer(self, key: Hashable = None) -> Tensor | None:
        """The momentum ``u`` of ``key`` (``None`` before its first step)."""
        return self._momenta.get(key)

    def velocity(self, key: Hashable = None) -> Tensor | None:
        """The accumulated velocity ``v`` of ``key`` after the latest update."""
        return self._velocities.get(key)

    def compensate(self, x: Tensor, key: Hashable = None) -> Tensor:
        grad = _flat_float32(x, key, "DGCMemory")
        if self.gradient_clipping is not None:
            norm = torch.linalg.vector_norm(grad)
            grad.mul_(torch.clamp(self.gradient_clipping / (norm + 1e-12), max=1.0))
        momentum = self._momenta.get(key)
        velocity = self._velocities.get(key)
        if momentum is None or velocity is None:
            momentum = torch.zeros_like(grad)
            velocity = torch.zeros_like(grad)
        _check_size(momentum, grad.numel(), key, "DGCMemory")
        if self.nesterov:
            momentum = (momentum + grad) * self.momentum
            velocity = velocity + momentum + grad
        else:
            momentum = momentum * self.momentum + grad
            velocity = velocity + momentum
        self._momenta[key] = momentum
        self._velocities[key] = velocity
        return velocity.clone()

    def update(self, key: Hashable, compensated: Tensor, sent_decompressed: Tensor) -> None:
        sent = sent_decompressed.reshape(-1).to(torch.float32)
        self._velocities[key] = compensated.reshape(-1).to(torch.float32) - sent
        momentum = self._momenta.get(key)
        if momentum is not None:
            self._momenta[key] = momentum.masked_fill(sent != 0, 0.0)

    def reset(self, key: Hashable = None) -> None:
        for store in (self._momenta, self._velocities):
            if key is None:
                store.clear()
            else:
                store.pop(key, None)

    def export_state(self, key: Hashable = None) -> dict[str, Tensor]:
        if key not in self._momenta or key not in self._velocities:
            return {}
        return {"momentum": self._momenta[key], "velocity": self._velocities[key]}

    def import_state(self, key: Hashable, state: dict[str, Tensor]) -> None:
        if "momentum" in state and "velocity" in state:
            self._momenta[key] = state["momentum"].reshape(-1).to(torch.float32, copy=True)
            self._velocities[key] = state["velocity"].reshape(-1).to(torch.float32, copy=True)

    def state_keys(self) -> list[Hashable]:
        return [k for k in self._momenta if k in self._velocities]

    def state_template(self, key: Hashable, numel: int) -> dict[str, Tensor]:
        return {"momentum": torch.zeros(numel), "velocity": torch.zeros(numel)}
