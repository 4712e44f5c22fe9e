"""What the prefix tree stores: KV segments and SSM checkpoints that know their size.

The tree never looks inside a state; it only asks for its size and, for the
attention KV of an edge, to cut it in two (when an edge is split) or to join
two segments (when a node is merged into its only child). So the same tree and
policies serve two users:

* the simulator, which stores :class:`SizedKV` / :class:`SizedCheckpoint`
  (a byte count and nothing else), and
* an engine, which stores real tensors. With transformers 5.x a ``DynamicCache``
  holds ``DynamicLayer`` (``.keys``/``.values`` of shape ``[B, H_kv, T, Dh]``)
  for attention layers and ``LinearAttentionLayer`` (``.conv_states[i]``,
  ``.recurrent_states[i]``) for SSM layers. An engine's KV segment would hold,
  per attention layer, ``keys[:, :, a:b]`` and ``values[:, :, a:b]`` of the
  edge's tokens (``split`` slices along dim 2, ``join`` concatenates), and its
  checkpoint a clone of every SSM layer's conv and recurrent state.

A :class:`StateSource` hands the tree the states of one request as it inserts
them: ``kv(start, end)`` for the tokens of a new edge and ``checkpoint(pos)``
for the SSM state after token ``pos``. It also answers the sizes beforehand,
so the cache can evict before anything is built.

A checkpoint may carry the logits of its position's last token beside the SSM
state (:attr:`Checkpoint.logits_nbytes` > 0): a request whose whole input ends
there then prefills nothing, its first output token comes from those logits.
They are part of the checkpoint's ``nbytes``, so the budget counts them and
evicting the checkpoint frees them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

__all__ = [
    "Checkpoint",
    "KVSegment",
    "SizedCheckpoint",
    "SizedKV",
    "SizedSource",
    "StateSource",
]


@runtime_checkable
class KVSegment(Protocol):
    """Attention KV of a run of consecutive tokens, for every attention layer."""

    @property
    def nbytes(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...

    def split(self, k: int) -> tuple[KVSegment, KVSegment]:
        """The first ``k`` tokens' KV and the rest (0 < k < num_tokens)."""
        ...

    def join(self, tail: KVSegment) -> KVSegment:
        """This segment followed by ``tail`` (the KV of the tokens right after)."""
        ...


@runtime_checkable
class Checkpoint(Protocol):
    """SSM state (conv + recurrent, every SSM layer) after one token position,
    and optionally the logits there (``nbytes`` counts both)."""

    @property
    def nbytes(self) -> int: ...

    @property
    def logits_nbytes(self) -> int:
        """Bytes of the stored logits (0: none, a hit here must run the last token)."""
        ...


class StateSource(Protocol):
    """The states of one request, handed to :meth:`RadixTree.insert`."""

    def kv_nbytes(self, num_tokens: int) -> int:
        """Bytes that ``kv(start, start + num_tokens)`` will occupy."""
        ...

    def checkpoint_nbytes(self, position: int) -> int:
        """Bytes that ``checkpoint(position)`` will occupy (the logits included)."""
        ...

    def kv(self, start: int, end: int) -> KVSegment:
        """KV of tokens ``start .. end-1`` of the inserted sequence."""
        ...

    def checkpoint(self, position: int) -> Checkpoint:
        """SSM state after the first ``position`` tokens of the inserted sequence."""
        ...


@dataclass(frozen=True, slots=True)
class SizedKV:
    """KV of ``num_tokens`` tokens, as a byte count only (simulator)."""

    num_tokens: int
    bytes_per_token: int

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.bytes_per_token

    def split(self, k: int) -> tuple[SizedKV, SizedKV]:
        if not 0 < k < self.num_tokens:
            raise ValueError(f"split point {k} must lie strictly inside 0..{self.num_tokens}")
        return (
            SizedKV(k, self.bytes_per_token),
            SizedKV(self.num_tokens - k, self.bytes_per_token),
        )

    def join(self, tail: KVSegment) -> SizedKV:
        if not isinstance(tail, SizedKV) or tail.bytes_per_token != self.bytes_per_token:
            raise TypeError(f"cannot join {tail!r} to {self!r}: different per-token sizes")
        return SizedKV(self.num_tokens + tail.num_tokens, self.bytes_per_token)


@dataclass(frozen=True, slots=True)
class SizedCheckpoint:
    """An SSM checkpoint, as a byte count only (simulator); ``nbytes`` includes
    the ``logits_nbytes`` of logits stored beside it."""

    nbytes: int
    logits_nbytes: int = 0


@dataclass(frozen=True, slots=True)
class SizedSource:
    """A :class:`StateSource` that builds size-only states.

    Args:
        kv_bytes_per_token: KV bytes of one token summed over attention layers.
        checkpoint_bytes: bytes of one SSM checkpoint summed over SSM layers.
        logits_bytes: bytes of one position's logits.
        logits_at: positions whose checkpoint also stores the logits
            (:meth:`with_logits`).
    """

    kv_bytes_per_token: int
    checkpoint_bytes: int
    logits_bytes: int = 0
    logits_at: frozenset[int] = frozenset()

    def with_logits(self, positions: Iterable[int]) -> SizedSource:
        """This source, storing the logits beside the checkpoints at ``positions``."""
        return replace(self, logits_at=frozenset(positions))

    def kv_nbytes(self, num_tokens: int) -> int:
        return num_tokens * self.kv_bytes_per_token

    def checkpoint_nbytes(self, position: int) -> int:
        logits = self.logits_bytes if position in self.logits_at else 0
        return self.checkpoint_bytes + logits

    def kv(self, start: int, end: int) -> SizedKV:
        return SizedKV(end - start, self.kv_bytes_per_token)

    def checkpoint(self, position: int) -> SizedCheckpoint:
        logits = self.logits_bytes if position in self.logits_at else 0
        return SizedCheckpoint(self.checkpoint_bytes + logits, logits)
