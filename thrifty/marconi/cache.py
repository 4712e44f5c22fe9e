"""The prefix cache: one radix tree, an admission policy, an eviction policy, a byte budget.

One request goes through it in two calls, so an engine can prefill in between:

1. :meth:`PrefixCache.lookup` matches the input and touches what the hit used.
   The hit is :attr:`MatchResult.hit_length` tokens (restore the KV of the
   path and the SSM checkpoint of ``hit_node``, prefill the rest).
   :meth:`PrefixCache.checkpoint_positions` then says which SSM states to keep
   (a branch point inside the input must be captured during prefill).
2. :meth:`PrefixCache.admit` stores input + output with those checkpoints. It
   plans the bytes first, pins the request's path, evicts until the plan fits,
   then inserts; the budget is never exceeded (a request whose path cannot
   fit at all is not admitted, or truncated if asked).

:meth:`PrefixCache.serve` does both with size-only states (the simulator).
The three systems of the paper are :func:`build_cache` ("marconi", "sglang+",
"vllm+").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from thrifty.marconi.model import ModelSpec
from thrifty.marconi.policies import (
    AdmissionPolicy,
    BlockAdmission,
    EvictionPolicy,
    LRUEviction,
    MarconiAdmission,
    UtilityEviction,
)
from thrifty.marconi.states import StateSource
from thrifty.marconi.tree import InsertPlan, MatchResult, RadixTree

if TYPE_CHECKING:
    from thrifty.marconi.tuner import AlphaTuner

__all__ = ["POLICIES", "AdmitResult", "CacheStats", "PrefixCache", "RequestOutcome", "build_cache"]

log = logging.getLogger(__name__)

POLICIES = ("vllm+", "sglang+", "marconi")


@dataclass(frozen=True)
class AdmitResult:
    admitted: bool
    bytes_added: int
    checkpoints_added: int
    leaf_evictions: int
    checkpoint_evictions: int


@dataclass(frozen=True)
class RequestOutcome:
    """One served request, as the simulator records it."""

    input_tokens: int
    output_tokens: int
    hit_tokens: int
    matched_tokens: int
    flops_saved: float
    admitted: bool
    bytes_added: int
    checkpoints_added: int
    leaf_evictions: int
    checkpoint_evictions: int


@dataclass
class CacheStats:
    requests: int = 0
    input_tokens: int = 0
    hit_tokens: int = 0
    flops_saved: float = 0.0
    flops_total: float = 0.0
    leaf_evictions: int = 0
    checkpoint_evictions: int = 0
    truncated: int = 0
    rejected: int = 0

    @property
    def evictions(self) -> int:
        return self.leaf_evictions + self.checkpoint_evictions

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PrefixCache:
    """A byte-budgeted prefix cache for a hybrid model.

    Args:
        capacity_bytes: the budget; ``tree.nbytes`` never exceeds it.
        spec: the model (FLOPs saved, state sizes for the simulator).
        admission: where to checkpoint.
        eviction: what to evict; it is attached to this cache's tree.
        tuner: optional online tuner of ``eviction.alpha``.
        name: label in results.
        truncate_oversized: a request whose path cannot fit even in an
            otherwise empty cache keeps its leading checkpoints that fit
            (True) or is not admitted at all (False, default: it would flush
            the whole cache for a prefix that the next turn outgrows anyway).

    Example (an engine; ``TensorSource`` is the engine's :class:`StateSource`)::

        match = cache.lookup(input_ids)
        kv_segments = [node.kv for node in match.hit_path]  # concatenate per layer
        ssm = match.hit_node.checkpoint  # None on a miss
        positions = cache.checkpoint_positions(match, len(input_ids), max_new_tokens)
        # prefill input_ids[match.hit_length:], capturing the SSM state at every
        # position <= len(input_ids); decode; then, with the real output length:
        positions = cache.checkpoint_positions(match, len(input_ids), len(output_ids))
        cache.admit(input_ids + output_ids, positions, TensorSource(...))
    """

    def __init__(
        self,
        capacity_bytes: int,
        spec: ModelSpec,
        admission: AdmissionPolicy,
        eviction: EvictionPolicy,
        *,
        tuner: AlphaTuner | None = None,
        name: str | None = None,
        truncate_oversized: bool = False,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self.spec = spec
        self.admission = admission
        self.eviction = eviction
        self.tuner = tuner
        self.name = name or f"{admission.name}/{eviction.name}"
        self.tree = RadixTree()
        eviction.attach(self.tree)
        self.source = spec.source()
        self.truncate_oversized = truncate_oversized
        self.stats = CacheStats()

    # ------------------------------------------------------------------ engine API

    def lookup(self, input_tokens: Sequence[int], max_hit: int | None = None) -> MatchResult:
        """Match ``input_tokens`` and touch what the hit used (per the eviction policy)."""
        match = self.tree.match_prefix(input_tokens, max_hit)
        self.tree.tick()
        if self.eviction.touch_path:
            self.tree.touch(match.path)
        elif not match.hit_node.is_root:
            self.tree.touch([match.hit_node])
        return match

    def checkpoint_positions(
        self, match: MatchResult, num_input: int, num_output: int
    ) -> list[int]:
        """Positions whose SSM state the request should hand to :meth:`admit`."""
        return self.admission.checkpoint_positions(match, num_input, num_output)

    def admit(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        source: StateSource | None = None,
    ) -> AdmitResult:
        """Store ``tokens`` with checkpoints at ``positions``, evicting first if needed."""
        tree = self.tree
        tokens = tokens if isinstance(tokens, list) else list(tokens)
        source = source if source is not None else self.source
        positions = sorted({p for p in positions if 0 < p <= len(tokens)})
        plan = tree.plan_insert(tokens, positions)
        need = plan.nbytes(source)
        leaf = ckpt = 0
        if self._footprint(plan, source) > self.capacity_bytes:
            # Even an otherwise empty cache could not hold this request's path.
            if self.truncate_oversized:
                positions = self._fitting_prefix(tokens, positions, source)
            if not positions or not self.truncate_oversized:
                self.stats.rejected += 1
                return AdmitResult(False, 0, 0, 0, 0)
            self.stats.truncated += 1
            plan = tree.plan_insert(tokens, positions)
            need = plan.nbytes(source)
        tree.pin(plan.pin_nodes)
        try:
            while tree.nbytes + need > self.capacity_bytes:
                victim = self.eviction.select_victim()
                if victim is None:
                    break
                if tree.evict(victim).kind == "leaf":
                    leaf += 1
                else:
                    ckpt += 1
                tree.tick()
            self.stats.leaf_evictions += leaf
            self.stats.checkpoint_evictions += ckpt
            if tree.nbytes + need > self.capacity_bytes:
                self.stats.rejected += 1
                return AdmitResult(False, 0, 0, leaf, ckpt)
            tree.tick()
            result = tree.insert(tokens, positions, source)
            if result.added_bytes != need:
                raise RuntimeError(
                    f"insert added {result.added_bytes} bytes but {need} were planned: "
                    "the state source's sizes disagree with the states it builds"
                )
            if self.eviction.touch_path:
                tree.touch(result.path)
        finally:
            tree.unpin(plan.pin_nodes)
        assert tree.nbytes <= self.capacity_bytes
        return AdmitResult(True, need, result.new_checkpoints, leaf, ckpt)

    @staticmethod
    def _footprint(plan: InsertPlan, source: StateSource) -> int:
        """Bytes the request's path needs once everything else is evicted."""
        return plan.nbytes(source) + sum(node.nbytes for node in plan.pin_nodes)

    def _fitting_prefix(
        self, tokens: list[int], positions: list[int], source: StateSource
    ) -> list[int]:
        """The longest prefix of ``positions`` whose path fits in the whole budget."""
        lo, hi = 0, len(positions)  # positions[:lo] fits, positions[:hi + 1] does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            plan = self.tree.plan_insert(tokens, positions[:mid])
            if self._footprint(plan, source) <= self.capacity_bytes:
                lo = mid
            else:
                hi = mid - 1
        return positions[:lo]

    # ------------------------------------------------------------------ simulator API

    def serve(self, input_tokens: Sequence[int], output_tokens: Sequence[int]) -> RequestOutcome:
        """Look up, then admit input + output with size-only states; update stats."""
        input_tokens = input_tokens if isinstance(input_tokens, list) else list(input_tokens)
        output_tokens = output_tokens if isinstance(output_tokens, list) else list(output_tokens)
        n_in, n_out = len(input_tokens), len(output_tokens)
        match = self.lookup(input_tokens)
        positions = self.checkpoint_positions(match, n_in, n_out)
        admitted = self.admit(input_tokens + output_tokens, positions)
        return self.record(input_tokens, output_tokens, match, admitted)

    def record(
        self,
        input_tokens: list[int],
        output_tokens: list[int],
        match: MatchResult,
        admitted: AdmitResult,
    ) -> RequestOutcome:
        """Count a served request in :attr:`stats` and hand it to the tuner.

        :meth:`serve` calls it; an engine that calls :meth:`lookup` and
        :meth:`admit` itself calls it after :meth:`admit`.
        """
        n_in, n_out = len(input_tokens), len(output_tokens)
        hit = min(match.hit_length, n_in)
        outcome = RequestOutcome(
            input_tokens=n_in,
            output_tokens=n_out,
            hit_tokens=hit,
            matched_tokens=min(match.matched_length, n_in),
            flops_saved=self.spec.prefill_flops(hit),
            admitted=admitted.admitted,
            bytes_added=admitted.bytes_added,
            checkpoints_added=admitted.checkpoints_added,
            leaf_evictions=admitted.leaf_evictions,
            checkpoint_evictions=admitted.checkpoint_evictions,
        )
        stats = self.stats
        stats.requests += 1
        stats.input_tokens += n_in
        stats.hit_tokens += hit
        stats.flops_saved += outcome.flops_saved
        stats.flops_total += self.spec.prefill_flops(n_in)
        if self.tuner is not None:
            self.tuner.after_request(self, input_tokens, output_tokens, outcome)
        return outcome

    def snapshot(self) -> PrefixCache:
        """A size-only copy (tree, clock, policy parameters; no tuner, fresh stats)."""
        twin = PrefixCache.__new__(PrefixCache)
        twin.capacity_bytes = self.capacity_bytes
        twin.spec = self.spec
        twin.admission = self.admission
        twin.eviction = self.eviction.fresh()
        twin.tuner = None
        twin.name = self.name
        twin.tree = self.tree.clone_sized()
        twin.eviction.attach(twin.tree)
        twin.source = self.source
        twin.truncate_oversized = self.truncate_oversized
        twin.stats = CacheStats()
        return twin


def build_cache(
    policy: str,
    capacity_bytes: int,
    spec: ModelSpec,
    *,
    alpha: float = 0.0,
    tuner: AlphaTuner | None = None,
    block_size: int = 32,
    truncate_oversized: bool = False,
) -> PrefixCache:
    """The paper's systems.

    * ``"marconi"``: Marconi admission + utility eviction (``alpha``, or tuned
      online by ``tuner``; the paper's tuner starts from alpha 0).
    * ``"sglang+"``: Marconi admission + LRU over leaves, path touched.
    * ``"vllm+"``: a checkpoint every ``block_size`` tokens + LRU over leaves.

    ``truncate_oversized`` is passed to :class:`PrefixCache`.
    """
    extra = {"truncate_oversized": truncate_oversized}
    if policy == "marconi":
        return PrefixCache(
            capacity_bytes,
            spec,
            MarconiAdmission(),
            UtilityEviction(spec, alpha),
            tuner=tuner,
            name="marconi",
            **extra,
        )
    if tuner is not None:
        raise ValueError(f"policy {policy!r} has no alpha to tune")
    if policy == "sglang+":
        return PrefixCache(
            capacity_bytes, spec, MarconiAdmission(), LRUEviction(), name="sglang+", **extra
        )
    if policy == "vllm+":
        return PrefixCache(
            capacity_bytes, spec, BlockAdmission(block_size), LRUEviction(), name="vllm+", **extra
        )
    raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
