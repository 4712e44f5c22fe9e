"""The prefix cache: one radix tree, an admission policy, an eviction policy, a byte budget.

One request goes through it in two calls, so an engine can prefill in between
(SGLang hides the same sequence behind ``match_prefix`` and
``cache_finished_req``):

1. :meth:`PrefixCache.begin` matches the input, touches what the hit used and
   returns a :class:`CacheRequest`: the hit (:attr:`~CacheRequest.hit_length`
   tokens; restore :attr:`~CacheRequest.hit_kv` and
   :attr:`~CacheRequest.hit_checkpoint`, prefill the rest) and the positions
   whose SSM states the request must capture: inside the input
   (:attr:`~CacheRequest.prefill_positions`, e.g. Marconi's branch point, which
   prefill must end a piece at) and in the output
   (:attr:`~CacheRequest.output_positions`).
2. :meth:`CacheRequest.finish` stores input + output with those checkpoints and
   counts the request. It plans the bytes first, pins the request's path,
   evicts until the plan fits, then inserts; the budget is never exceeded (a
   request whose path cannot fit at all is not admitted, or truncated if
   asked).

Zero-prefill hits (``store_logits``, not in the paper). A hit needs the SSM
state *after* its last token, and an engine also needs that token's logits for
the first output token, so without them a request whose whole input is cached
falls back to the checkpoint before and runs the last stretch again. With
``store_logits`` the logits of the last token are stored beside each new
checkpoint that ends the request's input or its input + output (the engine
has them there anyway: prefill and the last fed token end there), charged at
their real bytes; a later input that ends exactly there (a retry, a
regenerate, a tool loop that resends input + output) prefills nothing
(:attr:`CacheRequest.hit_length` = the whole input).

The simulator (:meth:`PrefixCache.serve`) and the engine
(:class:`~thrifty.marconi.engine.HybridEngine`) both go through these two
calls; only the states differ (sizes vs tensors). :func:`build_cache` builds
the paper's systems ("marconi", "sglang+", "vllm+") and today's engines
("sglang", "seglen", "vllm").
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from thrifty.marconi.model import ModelSpec
from thrifty.marconi.policies import (
    AdmissionPolicy,
    BlockAdmission,
    EvictionPolicy,
    LRUEviction,
    MarconiAdmission,
    SegLenEviction,
    SGLangAdmission,
    SGLangEviction,
    UtilityEviction,
    VLLMAlignAdmission,
    VLLMEviction,
    vllm_align_geometry,
)
from thrifty.marconi.states import Checkpoint, KVSegment, SizedSource, StateSource
from thrifty.marconi.tree import InsertPlan, MatchResult, RadixTree

if TYPE_CHECKING:
    from thrifty.marconi.tuner import AlphaTuner

__all__ = [
    "BASELINES",
    "PAPER_POLICIES",
    "POLICIES",
    "AdmitResult",
    "CacheRequest",
    "CacheStats",
    "PrefixCache",
    "RequestOutcome",
    "build_cache",
]

log = logging.getLogger(__name__)

POLICIES = ("vllm+", "sglang+", "marconi", "sglang", "seglen", "vllm")
"""Every policy :func:`build_cache` builds."""
PAPER_POLICIES = ("vllm+", "sglang+", "marconi")
"""The paper's three systems (the default sweep)."""
BASELINES = tuple(p for p in POLICIES if p != "marconi")
"""Everything Marconi is compared against."""


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
    full_hits: int = 0
    """Requests whose hit covered the whole input (they prefilled nothing)."""

    @property
    def evictions(self) -> int:
        return self.leaf_evictions + self.checkpoint_evictions

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class CacheRequest:
    """One request's way through a :class:`PrefixCache`, from :meth:`PrefixCache.begin`
    to :meth:`finish`.

    Attributes:
        cache: the cache it came from.
        input_tokens: the request's input.
        num_output: output tokens the positions were planned for.
        match: what the tree held of the input when the request began.
        positions: positions beyond the hit whose SSM states the request should
            store (1-based token counts into input + output), from the
            admission policy.

    A hit covering the whole input (``hit_length == len(input_tokens)``, only
    with the cache's ``store_logits``) holds the last input token's logits in
    ``hit_checkpoint``: the engine prefills nothing.
    """

    cache: PrefixCache
    input_tokens: list[int]
    num_output: int
    match: MatchResult
    positions: tuple[int, ...]
    _prefill: tuple[int, ...] | None = field(default=None, repr=False)
    _finished: bool = field(default=False, repr=False)

    @property
    def hit_length(self) -> int:
        """Input tokens the cache restores (0 on a miss)."""
        return self.match.hit_length

    @property
    def hit_kv(self) -> tuple[KVSegment, ...]:
        """KV segments of the hit, top-down; concatenated they cover ``hit_length`` tokens."""
        return tuple(node.kv for node in self.match.hit_path)

    @property
    def hit_checkpoint(self) -> Checkpoint | None:
        """The SSM state after ``hit_length`` tokens (None on a miss)."""
        node = self.match.hit_node
        return None if node.is_root else node.checkpoint

    @property
    def prefill_positions(self) -> tuple[int, ...]:
        """Positions inside the input whose state prefill must capture: planned
        ones the tree does not hold yet (prefill ends a piece at each)."""
        if self._prefill is None:
            if self._finished:
                raise RuntimeError("prefill_positions must be read before finish()")
            n_in = len(self.input_tokens)
            inside = [p for p in self.positions if p <= n_in]
            new = set(self.cache.tree.plan_insert(self.input_tokens, inside).new_checkpoints)
            self._prefill = tuple(p for p in inside if p in new)
        return self._prefill

    @property
    def output_positions(self) -> tuple[int, ...]:
        """Positions after the input whose state decoding must capture."""
        n_in = len(self.input_tokens)
        return tuple(p for p in self.positions if p > n_in)

    @property
    def logits_positions(self) -> tuple[int, ...]:
        """Positions among those captured whose last token's logits to store beside
        the state (with the cache's ``store_logits``: the input's end and the
        sequence's end; empty otherwise)."""
        return self.cache._logits_positions(self.positions, len(self.input_tokens), self.num_output)

    def finish(
        self, output_tokens: Sequence[int], source: StateSource | None = None
    ) -> RequestOutcome:
        """Store input + output with the planned states, count the request, return it.

        Args:
            output_tokens: what was decoded (or fed). If its length differs
                from ``num_output`` the positions are planned again for it, and
                ``source`` must hold the states at those.
            source: the request's states (an engine's tensors); default: the
                cache's size-only states.
        """
        if self._finished:
            raise RuntimeError("finish() was already called for this request")
        self._finished = True
        output = token_list(output_tokens, "output_tokens")
        cache, n_in = self.cache, len(self.input_tokens)
        positions = self.positions
        if len(output) != self.num_output:
            positions = cache._positions(self.match, n_in, len(output))
        if source is None and cache.store_logits:
            source = cache.source.with_logits(cache._logits_positions(positions, n_in, len(output)))
        admitted = cache.admit(self.input_tokens + output, positions, source)
        return self.cache._record(self.input_tokens, output, self.match, admitted)


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
        state_capacity_bytes: split the budget into two pools, as SGLang does:
            this many bytes for SSM states, the rest for KV, each pool evicted
            on its own (``eviction.select_state_victim`` and
            ``eviction.select_victim``). Default: one shared budget.
        source: the size-only states the simulator stores (default
            ``spec.source()``; vLLM charges its padded state pages).
        store_logits: store the last token's logits beside each new checkpoint
            at a request's input end or sequence end, charged at
            ``spec.logits_bytes`` in the simulator (the tensor's bytes in an
            engine), so that a later input ending there prefills nothing (see
            the module docstring). Off by default: the paper's systems do not.
        need_logits: :meth:`serve` (the simulator) models an engine, which
            must have the last input token's logits: a hit covering the whole
            input is taken only at a checkpoint that stores them, else it falls
            back to the checkpoint before (an engine passes
            ``begin(..., need_logits=True)`` itself). Off by default: the
            paper's simulator counts every whole-input match as a hit.

    Example (an engine; ``TensorSource`` is the engine's :class:`StateSource`)::

        request = cache.begin(input_ids, max_new_tokens, need_logits=True)
        kv_segments = request.hit_kv  # concatenate per layer
        ssm = request.hit_checkpoint  # None on a miss
        # prefill input_ids[request.hit_length:] in pieces that end at each of
        # request.prefill_positions, capturing the SSM state there (nothing
        # when the hit is the whole input: the first token comes from
        # ssm.logits); decode, capturing at request.output_positions; keep the
        # logits beside the states at request.logits_positions; then:
        outcome = request.finish(output_ids, TensorSource(...))
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
        state_capacity_bytes: int | None = None,
        source: StateSource | None = None,
        store_logits: bool = False,
        need_logits: bool = False,
    ) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, numbers.Real):
            raise TypeError(
                f"capacity_bytes must be a number of bytes, got {type(capacity_bytes).__name__} "
                f"{capacity_bytes!r}"
            )
        if not 0 < capacity_bytes < math.inf:
            raise ValueError(f"capacity_bytes must be a finite number > 0, got {capacity_bytes}")
        # Policies are protocols, not base classes: check the one method each must have.
        if not isinstance(spec, ModelSpec):
            raise TypeError(
                f"spec must be a ModelSpec (e.g. paper_hybrid_7b()), got {type(spec).__name__} "
                f"{spec!r}"
            )
        if not callable(getattr(admission, "checkpoint_positions", None)):
            raise TypeError(
                f"admission must be an admission policy (e.g. MarconiAdmission()), got "
                f"{type(admission).__name__} {admission!r}; build_cache(policy, ...) builds "
                "the named systems"
            )
        if not callable(getattr(eviction, "select_victim", None)):
            raise TypeError(
                f"eviction must be an eviction policy (e.g. LRUEviction()), got "
                f"{type(eviction).__name__} {eviction!r}"
            )
        if state_capacity_bytes is not None:
            if not 0 < state_capacity_bytes < capacity_bytes:
                raise ValueError(
                    f"state_capacity_bytes must lie strictly between 0 and capacity_bytes "
                    f"{capacity_bytes}, got {state_capacity_bytes}"
                )
            if not callable(getattr(eviction, "select_state_victim", None)):
                raise ValueError(
                    f"eviction policy {eviction.name!r} has one pool; a split budget "
                    "(state_capacity_bytes) needs select_state_victim"
                )
        self.capacity_bytes = int(capacity_bytes)
        self.state_capacity_bytes = (
            None if state_capacity_bytes is None else int(state_capacity_bytes)
        )
        self.spec = spec
        self.admission = admission
        self.eviction = eviction
        self.tuner = tuner
        self.name = name or f"{admission.name}/{eviction.name}"
        self.tree = RadixTree()
        eviction.attach(self.tree)
        self.source = source if source is not None else spec.source()
        if store_logits and (
            not isinstance(self.source, SizedSource) or self.source.logits_bytes <= 0
        ):
            raise ValueError(
                f"store_logits needs the size of one position's logits, but the state source "
                f"{self.source!r} has none: build the spec with logits_bytes "
                "(ModelSpec.from_hf_config sets vocab_size x dtype bytes)"
            )
        self.store_logits = bool(store_logits)
        self.need_logits = bool(need_logits)
        self.truncate_oversized = truncate_oversized
        self.stats = CacheStats()

    # ------------------------------------------------------------------ one request

    def begin(
        self,
        input_tokens: Sequence[int],
        num_output: int,
        *,
        max_hit: int | None = None,
        need_logits: bool | None = None,
    ) -> CacheRequest:
        """Match a request's input and plan its checkpoints; see :class:`CacheRequest`.

        Args:
            input_tokens: the input.
            num_output: output tokens the request will produce.
            max_hit: ignore checkpoints deeper than this.
            need_logits: the caller takes the first output token from the last
                input token's logits (an engine): a hit covers the whole input
                only at a checkpoint that stores them (``store_logits``), else
                it stops at the checkpoint before. Default: the cache's
                ``need_logits``.
        """
        if num_output < 0:
            raise ValueError(f"num_output must be >= 0, got {num_output}")
        tokens = token_list(input_tokens, "input_tokens")
        need = self.need_logits if need_logits is None else need_logits
        match = self.lookup(tokens, max_hit, need_logits=need)
        positions = tuple(self._positions(match, len(tokens), num_output))
        return CacheRequest(self, tokens, num_output, match, positions)

    def serve(self, input_tokens: Sequence[int], output_tokens: Sequence[int]) -> RequestOutcome:
        """:meth:`begin` then :meth:`CacheRequest.finish` with size-only states (the simulator)."""
        output = token_list(output_tokens, "output_tokens")
        return self.begin(input_tokens, len(output)).finish(output)

    # ------------------------------------------------------------------ steps

    def lookup(
        self,
        input_tokens: Sequence[int],
        max_hit: int | None = None,
        *,
        need_logits: bool = False,
    ) -> MatchResult:
        """Match ``input_tokens`` and touch what the hit used (per the eviction policy).

        ``need_logits``: see :meth:`begin`.
        """
        tokens = token_list(input_tokens, "input_tokens")
        n = len(tokens)
        if need_logits and not self.store_logits:
            max_hit = n - 1 if max_hit is None else min(max_hit, n - 1)
        match = self.tree.match_prefix(tokens, max_hit)
        full = n > 0 and match.hit_length == n
        if need_logits and full and not match.hit_node.checkpoint.logits_nbytes:
            match = self.tree.match_prefix(tokens, n - 1)  # stored without logits
        self.tree.tick()
        self.eviction.on_hit(match)
        return match

    def checkpoint_positions(
        self, match: MatchResult, num_input: int, num_output: int
    ) -> list[int]:
        """Positions whose SSM state the admission policy stores (the hit's included)."""
        return self.admission.checkpoint_positions(match, num_input, num_output)

    def _logits_positions(
        self, positions: Sequence[int], num_input: int, num_output: int
    ) -> tuple[int, ...]:
        """Of ``positions``, those whose logits are stored: the input's and the sequence's end."""
        if not self.store_logits:
            return ()
        return tuple(p for p in positions if p in (num_input, num_input + num_output))

    def _positions(self, match: MatchResult, num_input: int, num_output: int) -> list[int]:
        """Positions a request must capture: the policy's, beyond the hit."""
        hit = match.hit_length
        return [p for p in self.checkpoint_positions(match, num_input, num_output) if p > hit]

    def admit(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        source: StateSource | None = None,
    ) -> AdmitResult:
        """Store ``tokens`` with checkpoints at ``positions``, evicting first if needed."""
        tree = self.tree
        tokens = token_list(tokens, "tokens")
        source = source if source is not None else self.source
        positions = sorted({p for p in positions if 0 < p <= len(tokens)})
        plan = tree.plan_insert(tokens, positions)
        if not self._fits_alone(plan, source):
            # Even an otherwise empty cache could not hold this request's path.
            if self.truncate_oversized:
                positions = self._fitting_prefix(tokens, positions, source)
            if not positions or not self.truncate_oversized:
                self.stats.rejected += 1
                return AdmitResult(False, 0, 0, 0, 0)
            self.stats.truncated += 1
            plan = tree.plan_insert(tokens, positions)
        need_state = plan.state_nbytes(source)
        need = plan.nbytes(source)
        tree.pin(plan.pin_nodes)
        try:
            leaf, ckpt = self._make_room(need - need_state, need_state)
            self.stats.leaf_evictions += leaf
            self.stats.checkpoint_evictions += ckpt
            if not self._has_room(need - need_state, need_state):
                self.stats.rejected += 1
                return AdmitResult(False, 0, 0, leaf, ckpt)
            tree.tick()
            result = tree.insert(tokens, positions, source)
            if result.added_bytes != need:
                raise RuntimeError(
                    f"insert added {result.added_bytes} bytes but {need} were planned: "
                    "the state source's sizes disagree with the states it builds"
                )
            self.eviction.on_insert(result)
        finally:
            tree.unpin(plan.pin_nodes)
        trimmed = self.eviction.trim_path(result)
        self.stats.checkpoint_evictions += trimmed
        assert tree.nbytes <= self.capacity_bytes
        return AdmitResult(True, need, result.new_checkpoints, leaf, ckpt + trimmed)

    def _make_room(self, need_kv: int, need_state: int) -> tuple[int, int]:
        """Evict until the plan fits (or nothing is left); (leaf, checkpoint) evictions."""
        tree, eviction = self.tree, self.eviction
        leaf = ckpt = 0
        if self.state_capacity_bytes is None:
            pools = [(lambda: tree.nbytes + need_kv + need_state > self.capacity_bytes, None)]
        else:
            kv_capacity = self.capacity_bytes - self.state_capacity_bytes
            pools = [
                (
                    lambda: tree.state_nbytes + need_state > self.state_capacity_bytes,
                    eviction.select_state_victim,
                ),
                (lambda: tree.nbytes - tree.state_nbytes + need_kv > kv_capacity, None),
            ]
        for over, select in pools:
            select = select or eviction.select_victim
            while over():
                victim = select()
                if victim is None:
                    break
                if tree.evict(victim).kind == "leaf":
                    leaf += 1
                else:
                    ckpt += 1
                tree.tick()
        return leaf, ckpt

    def _has_room(self, need_kv: int, need_state: int) -> bool:
        tree = self.tree
        if self.state_capacity_bytes is None:
            return tree.nbytes + need_kv + need_state <= self.capacity_bytes
        kv_capacity = self.capacity_bytes - self.state_capacity_bytes
        return (
            tree.state_nbytes + need_state <= self.state_capacity_bytes
            and tree.nbytes - tree.state_nbytes + need_kv <= kv_capacity
        )

    def _fits_alone(self, plan: InsertPlan, source: StateSource) -> bool:
        """Whether the request's path fits once everything else is evicted."""
        if self.state_capacity_bytes is None:
            return plan.nbytes(source) + sum(n.nbytes for n in plan.pin_nodes) <= (
                self.capacity_bytes
            )
        state = plan.state_nbytes(source) + sum(
            n.checkpoint.nbytes for n in plan.pin_nodes if n.checkpoint is not None
        )
        kv = source.kv_nbytes(plan.new_kv_tokens) + sum(n.kv.nbytes for n in plan.pin_nodes)
        return (
            state <= self.state_capacity_bytes
            and kv <= self.capacity_bytes - self.state_capacity_bytes
        )

    def _fitting_prefix(
        self, tokens: list[int], positions: list[int], source: StateSource
    ) -> list[int]:
        """The longest prefix of ``positions`` whose path fits in the whole budget."""
        lo, hi = 0, len(positions)  # positions[:lo] fits, positions[:hi + 1] does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._fits_alone(self.tree.plan_insert(tokens, positions[:mid]), source):
                lo = mid
            else:
                hi = mid - 1
        return positions[:lo]

    def _record(
        self,
        input_tokens: list[int],
        output_tokens: list[int],
        match: MatchResult,
        admitted: AdmitResult,
    ) -> RequestOutcome:
        """Count a finished request in :attr:`stats` and hand it to the tuner."""
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
        stats.full_hits += n_in > 0 and hit == n_in
        stats.flops_saved += outcome.flops_saved
        stats.flops_total += self.spec.prefill_flops(n_in)
        if self.tuner is not None:
            self.tuner.after_request(self, input_tokens, output_tokens, outcome)
        return outcome

    def snapshot(self) -> PrefixCache:
        """A size-only copy (tree, clock, policy parameters; no tuner, fresh stats)."""
        twin = PrefixCache.__new__(PrefixCache)
        twin.capacity_bytes = self.capacity_bytes
        twin.state_capacity_bytes = self.state_capacity_bytes
        twin.spec = self.spec
        twin.admission = self.admission
        twin.eviction = self.eviction.fresh()
        twin.tuner = None
        twin.name = self.name
        twin.tree = self.tree.clone_sized()
        twin.eviction.attach(twin.tree)
        twin.source = self.source
        twin.truncate_oversized = self.truncate_oversized
        twin.store_logits = self.store_logits
        twin.need_logits = self.need_logits
        twin.stats = CacheStats()
        return twin


def token_list(tokens: Sequence[int], what: str) -> list[int]:
    """``tokens`` as a list; a tensor, an array or a string fails here, named.

    A tensor's elements hash by identity, so a tensor of ids would match
    nothing, silently; a string would be cached character by character. Only
    the container is checked (O(1)): the ids themselves are checked once, when
    a :class:`~thrifty.marconi.traces.Request` is built, not on every lookup.
    """
    if isinstance(tokens, list):
        return tokens
    if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence):
        raise TypeError(
            f"{what} must be a list of token ids (ints >= 0), got {type(tokens).__name__}; "
            "pass tensor.tolist() for a tensor of ids"
        )
    return list(tokens)


def build_cache(
    policy: str,
    capacity_bytes: int,
    spec: ModelSpec,
    *,
    alpha: float = 0.0,
    tuner: AlphaTuner | None = None,
    block_size: int = 32,
    truncate_oversized: bool = False,
    mamba_full_memory_ratio: float = 0.9,
    mamba_cache_chunk_size: int = 64,
    max_states_per_path: int | None = None,
    seglen_eff_weight: float = 0.85,
    vllm_block_size: int | None = None,
    prefix_match_unit: int | None = 64,
    store_logits: bool = False,
    need_logits: bool = False,
) -> PrefixCache:
    """The paper's systems and today's engines (see :mod:`thrifty.marconi.policies`).

    * ``"marconi"``: Marconi admission + utility eviction (``alpha``, or tuned
      online by ``tuner``; the paper's tuner starts from alpha 0).
    * ``"sglang+"``: Marconi admission + LRU over leaves, path touched.
    * ``"vllm+"``: a checkpoint every ``block_size`` tokens + LRU over leaves.
    * ``"sglang"``: SGLang's ``MambaRadixCache`` (extra_buffer): states on the
      ``mamba_cache_chunk_size`` grid, KV and states in two pools (states get
      ``r / (1 + r)`` of the budget, ``r = mamba_full_memory_ratio``, SGLang's
      ``--mamba-full-memory-ratio``), each evicted LRU;
      ``max_states_per_path`` is ``--mamba-max-states-per-path``.
    * ``"seglen"``: as ``"sglang"`` with SegLen eviction (``seglen_eff_weight``).
    * ``"vllm"``: vLLM align mode; the block size comes from the model's KV
      and state bytes (``vllm_block_size`` overrides it) and each state is
      charged its padded page; ``prefix_match_unit`` (None: off) sets the
      shared-prefix junction checkpoint.

    ``truncate_oversized``, ``store_logits`` (zero-prefill hits) and
    ``need_logits`` are passed to :class:`PrefixCache`.
    """
    extra = {
        "truncate_oversized": truncate_oversized,
        "store_logits": store_logits,
        "need_logits": need_logits,
    }
    if policy == "marconi":
        if not 0 <= alpha < math.inf:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
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
    if policy in ("sglang", "seglen"):
        if mamba_full_memory_ratio <= 0:
            raise ValueError(
                f"mamba_full_memory_ratio must be positive, got {mamba_full_memory_ratio}"
            )
        ratio = mamba_full_memory_ratio
        eviction = (
            SGLangEviction(max_states_per_path)
            if policy == "sglang"
            else SegLenEviction(seglen_eff_weight, max_states_per_path)
        )
        return PrefixCache(
            capacity_bytes,
            spec,
            SGLangAdmission(mamba_cache_chunk_size),
            eviction,
            name=policy,
            state_capacity_bytes=max(1, round(capacity_bytes * ratio / (1 + ratio))),
            **extra,
        )
    if policy == "vllm":
        block, padded = vllm_align_geometry(spec, block_size=vllm_block_size)
        return PrefixCache(
            capacity_bytes,
            spec,
            VLLMAlignAdmission(block, prefix_match_unit=prefix_match_unit),
            VLLMEviction(),
            name="vllm",
            source=SizedSource(spec.kv_bytes_per_token, padded, spec.logits_bytes),
            **extra,
        )
    raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
