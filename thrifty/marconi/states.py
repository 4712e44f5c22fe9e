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
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """SSM state (conv + recurrent, every SSM layer) after one token position."""

    @property
    def nbytes(self) -> int: ...


class StateSource(Protocol):
    """The states of one request, handed to :meth:`RadixTree.insert`."""

    def kv_nbytes(self, num_tokens: int) -> int:
        """Bytes that ``kv(start, start + num_tokens)`` will occupy."""
        ...

    def checkpoint_nbytes(self) -> int:
        """Bytes of one checkpoint."""
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
    """An SSM checkpoint, as a byte count only (simulator)."""

    nbytes: int


@dataclass(frozen=True, slots=True)
class SizedSource:
    """A :class:`StateSource` that builds size-only states.

    Args:
        kv_bytes_per_token: KV bytes of one token summed over attention layers.
        checkpoint_bytes: bytes of one SSM checkpoint summed over SSM layers.
    """

    kv_bytes_per_token: int
    checkpoint_bytes: int

    def kv_nbytes(self, num_tokens: int) -> int:
        return num_tokens * self.kv_bytes_per_token

    def checkpoint_nbytes(self) -> int:
        return self.checkpoint_bytes

    def kv(self, start: int, end: int) -> SizedKV:
        return SizedKV(end - start, self.kv_bytes_per_token)

    def checkpoint(self, position: int) -> SizedCheckpoint:
        return SizedCheckpoint(self.checkpoint_bytes)
