"""Admission (where to checkpoint) and eviction (what to free) policies.

Admission decides which SSM states a request stores:

* :class:`MarconiAdmission` (Marconi and SGLang+): the state after the last
  decoded token, plus, when the input shares more with the tree than a hit can
  reuse, the state at that branch point (speculative insertion: the branch is
  found by matching before prefill, and prefill also emits the state there).
  At most two checkpoints per request.
* :class:`BlockAdmission` (vLLM+): a checkpoint at every ``block_size``-th
  token, all kept; only whole blocks are cached, as vLLM hashes full blocks.
* :class:`SGLangAdmission` (today's SGLang, ``extra_buffer``): states only on
  the ``mamba_cache_chunk_size`` grid: the branch point rounded down to it, the
  end of every chunked-prefill chunk, and the request's last tracked state.
* :class:`VLLMAlignAdmission` (today's vLLM, ``mamba_cache_mode="align"``):
  states only at attention-block ends (the last of each prefill chunk and every
  one crossed while decoding), plus the shared-prefix junction.

Eviction decides what goes when the byte budget would be exceeded:

* :class:`LRUEviction` (SGLang+, vLLM+): the least recently used leaf; a hit
  touches its whole matched path.
* :class:`UtilityEviction` (Marconi): among nodes with at most one child, the
  lowest ``recency + alpha * flop_efficiency`` (both min-max normalised over the
  candidates, recency = 1 / (now - last access)); a hit touches only the node
  it used. A leaf is removed; a single-child node loses its checkpoint and
  merges into its child.
* :class:`SGLangEviction` and :class:`SegLenEviction`: SGLang's two pools, KV
  and Mamba states, each with its own budget and its own eviction order.
* :class:`VLLMEviction`: vLLM's one LRU queue of blocks, where an inner
  checkpoint can go before the leaf below it.

Every eviction policy also says what a hit and an insert touch
(:meth:`on_hit`, :meth:`on_insert`), so the cache never has to know which
timestamps a policy reads.

Cost of one eviction. LRU: a lazy-deletion heap, O(log n) amortised. Utility:
the normalisation changes with every eviction and with the clock, so no single
heap key orders the candidates. The policy keeps lazy heaps by last access and
by FLOP efficiency (min and max of each give the normalisation) and finds the
argmin with Fagin's threshold algorithm: walk both orders in step, score each
node seen, stop once the best score is no larger than the bound that any
unseen node must exceed. Exact, O(k log n) for k nodes examined, with k small
unless recency and efficiency are strongly anti-correlated (worst case O(n)).
Each tree change pushes O(1) heap entries; stale ones are skipped and the
heaps are rebuilt when more than half of their entries are stale.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import Protocol

from thrifty.marconi.model import ModelSpec
from thrifty.marconi.tree import InsertResult, MatchResult, RadixTree, TreeNode

__all__ = [
    "AdmissionPolicy",
    "BlockAdmission",
    "EvictionPolicy",
    "LRUEviction",
    "MarconiAdmission",
    "SGLangAdmission",
    "SGLangEviction",
    "SegLenEviction",
    "UtilityEviction",
    "VLLMAlignAdmission",
    "VLLMEviction",
    "replay_length",
    "vllm_align_geometry",
]


# --------------------------------------------------------------------------- admission


class AdmissionPolicy(Protocol):
    name: str

    def checkpoint_positions(
        self, match: MatchResult, num_input: int, num_output: int
    ) -> list[int]:
        """Token positions (1-based counts) whose SSM state the request should store."""
        ...


@dataclass(frozen=True)
class MarconiAdmission:
    """Checkpoint after the last decoded token, and at the input's branch point."""

    name: str = "marconi"

    def checkpoint_positions(
        self, match: MatchResult, num_input: int, num_output: int
    ) -> list[int]:
        positions = {num_input + num_output}
        if match.branch_required:
            positions.add(match.matched_length)
        return sorted(p for p in positions if p > 0)


@dataclass(frozen=True)
class BlockAdmission:
    """vLLM+: a checkpoint at every ``block_size`` tokens of input + output.

    Under a tight budget. With a checkpoint every 32 tokens (26.8 MB of state
    + 2 MB of KV per block on the paper's 7B) a request longer than about 1,100
    tokens cannot fit in 1 GB even in an empty cache. The rule followed here is
    the cache's, the same for every policy (:class:`~thrifty.marconi.cache.PrefixCache`,
    ``truncate_oversized=False``): such a request is not admitted at all and
    nothing is evicted for it; the cache keeps what it holds. The other rule,
    insert block by block and stop at the first block that cannot be made room
    for, is ``truncate_oversized=True``: it evicts everything else to keep the
    request's leading blocks, which the session's next, longer turn outgrows.
    On the 100-session ShareGPT trace (JSON turns) vLLM+ scores 1.48% at 1 GB
    under the first rule and 0.84% under the second (the "independent
    implementation" of issue 21), 2.71% / 2.31% at 2 GB. The artifact
    (``radix_cache_vllm.py``, ``RadixCache.insert``) does neither: it evicts what
    there is and inserts the whole request anyway, over its budget.
    """

    block_size: int = 32
    name: str = "block"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def checkpoint_positions(
        self, match: MatchResult, num_input: int, num_output: int
    ) -> list[int]:
        return list(range(self.block_size, num_input + num_output + 1, self.block_size))


@dataclass(frozen=True)
class SGLangAdmission:
    """Today's SGLang ``MambaRadixCache`` with ``--mamba-radix-cache-strategy extra_buffer``.

    Follows sgl-project/sglang ``python/sglang/srt/mem_cache/mamba_radix_cache.py``
    @00df707e (``cache_finished_req``, ``cache_unfinished_req``,
    ``_match_post_processor``) and ``mem_cache/unified_cache/components/mamba.py``
    @00b5ed64 (``finalize_match_result_in_tree_core``, ``prepare_for_caching_req``);
    ``arg_groups/overrides.py`` @003bbaf9 resolves the default ``auto`` strategy
    to ``extra_buffer`` whenever the overlap scheduler is on and the model
    supports it (Qwen3.5, Qwen3-Next, NemotronH, FalconH1, GraniteMoeHybrid).

    A request stores SSM states only where the scan materialises them, on the
    grid of ``chunk_size`` (``mamba_cache_chunk_size``: max of the model's
    Mamba chunk size, 64 for FLA kernels, and the page size):

    1. the branch point: the KV match rounded down to the grid, when that lies
       beyond the hit (``mamba_branching_seqlen``);
    2. the end of every chunked-prefill chunk but the last
       (``cache_unfinished_req``; chunks of ``chunked_prefill_size`` tokens);
    3. the last tracked state (``mamba_last_track_seqlen``): the input rounded
       down to the grid (tracked only if the final prefill chunk spans a whole
       grid step), or, if decoding crossed it, the last multiple of
       ``lcm(chunk_size, track_interval)`` (``--mamba-track-interval``). The
       KV after it is freed, not cached, so a request shorter than one grid
       step that decodes across no track point caches nothing.

    Not modelled: the input-length-minus-one cap on matching (issues #21158,
    #22935; the simulator matches the whole input for every policy) and the
    pool slots running requests hold.
    """

    chunk_size: int = 64
    track_interval: int = 256
    chunked_prefill_size: int | None = 8192
    name: str = "sglang"

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.track_interval < 1:
            raise ValueError(
                f"chunk_size and track_interval must be >= 1, got {self.chunk_size}, "
                f"{self.track_interval}"
            )
        size = self.chunked_prefill_size
        if size is not None and (size < self.chunk_size or size % self.chunk_size):
            raise ValueError(
                f"chunked_prefill_size must be a multiple of chunk_size {self.chunk_size} "
                f"(or None), got {size}"
            )

    def checkpoint_positions(
        self, match: MatchResult, num_input: int, num_output: int
    ) -> list[int]:
        grid, hit = self.chunk_size, match.hit_length
        positions = set()
        branch = match.matched_length // grid * grid
        if branch > hit:
            positions.add(branch)
        start = hit  # where the current prefill chunk starts
        step = self.chunked_prefill_size
        while step is not None and num_input - start > step:
            start += step
            positions.add(start)
        last = start + (num_input - start) // grid * grid
        decode_grid = math.lcm(grid, self.track_interval)
        decoded = (num_input + num_output) // decode_grid * decode_grid
        if decoded > num_input:
            last = decoded
        if last > hit:
            positions.add(last)
        return sorted(positions)


def vllm_align_geometry(
    spec: ModelSpec, *, alignment: int = 16, block_size: int | None = None
) -> tuple[int, int]:
    """vLLM's attention block size and the bytes of one padded SSM state page set.

    ``Platform._align_hybrid_block_size`` (vllm-project/vllm
    ``vllm/platforms/interface.py``, the ``mamba_cache_mode`` version whose
    comments PR #52898 clarifies; read from a stored copy without a commit
    hash): one attention layer's page (``block_size`` tokens of
    one layer's keys and values) must hold one SSM layer's state, so outside
    ``mamba_cache_mode="all"`` the block size is the smallest multiple of the
    kernel alignment (the backend's smallest block size, at least the
    configured 16) with ``block_size * kv_bytes_per_layer >= state_bytes``; the
    state page is then padded up to that page. Qwen3.5-4B (4 KV heads x 256,
    bf16; 2.15 MB of GDN state per layer) gives 528 (issue #40696).

    Returns ``(block_size, padded checkpoint bytes over all SSM layers)``.
    ``block_size`` overrides the computed size (tests on tiny models); a page
    smaller than a state is then charged at the state's own size.
    """
    kv = max((layer.kv_bytes_per_token for layer in spec.layers if layer.has_kv), default=0)
    state = max((layer.ssm_state_bytes for layer in spec.layers if layer.has_ssm), default=0)
    if kv <= 0 or state <= 0:
        raise ValueError(f"model {spec.name!r} is not a hybrid: KV {kv} B/token, state {state} B")
    if alignment < 1:
        raise ValueError(f"alignment must be >= 1, got {alignment}")
    if block_size is None:
        block_size = alignment * -(-state // (alignment * kv))
    elif block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return block_size, spec.num_ssm_layers * max(block_size * kv, state)


@dataclass(frozen=True)
class VLLMAlignAdmission:
    """Today's vLLM with ``mamba_cache_mode="align"`` (PR #30877).

    States live only on the attention block grid (``block_size`` from
    :func:`vllm_align_geometry`), because the scheduler splits prefill at block
    boundaries and keeps one state per scheduler step that ends on one:

    1. the last whole block of every prefill chunk (``max_num_batched_tokens``
       tokens); the blocks between hold null state blocks, so a request whose
       prefill is one chunk caches one state for its input (PR #43628 describes
       this);
    2. every block end crossed while decoding;
    3. the shared-prefix junction: the KV match rounded down to
       ``prefix_match_unit`` when it lies beyond the hit, so requests whose
       shared prefix ends inside a block reuse it. Issue 21 attributes this
       Marconi-style admission to PR #37898, whose text was not in the stored
       copies; followed here is vLLM's documentation ("Automatic Prefix
       Caching", v0.30: ``--enable-mamba-fine-grained-prefix-cache``, later
       ``--enable-mamba-shared-prefix-checkpoint``, with
       ``--prefix-match-unit``). vLLM turns it on only with EAGLE/MTP
       speculative decoding; ``prefix_match_unit=None`` is plain align mode.
       On by default here: the stronger baseline.

    Without the junction a prefix shorter than one block never hits (issue
    #40696, measured on Qwen3.5-4B's 528-token blocks; issue 21 also cites
    #48401): no state exists before the first block end.
    """

    block_size: int
    max_num_batched_tokens: int | None = 8192
    prefix_match_unit: int | None = 64
    name: str = "vllm"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        for label, value in (
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("prefix_match_unit", self.prefix_match_unit),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{label} must be >= 1 or None, got {value}")

    def checkpoint_positions(
        self, match: MatchResult, num_input: int, num_output: int
    ) -> list[int]:
        block, hit = self.block_size, match.hit_length
        positions = set()
        start = hit
        if self.max_num_batched_tokens is not None:
            step = max(block, self.max_num_batched_tokens // block * block)
            while num_input - start > step:
                start = (start + step) // block * block
                positions.add(start)
        positions.add(num_input // block * block)
        positions.update(range((num_input // block + 1) * block, num_input + num_output + 1, block))
        unit = self.prefix_match_unit
        if unit is not None and match.matched_length > hit:
            positions.add(match.matched_length // unit * unit)
        return sorted(p for p in positions if p > hit)


# --------------------------------------------------------------------------- eviction


class EvictionPolicy(Protocol):
    """Listens to a tree, keeps its own candidate index, picks victims, stamps hits.

    ``select_victim`` frees room in the cache's one byte budget (for a
    two-pool policy: in the KV pool); a two-pool policy also has
    ``select_state_victim`` for the pool of SSM states (see
    :class:`~thrifty.marconi.cache.PrefixCache`'s ``state_capacity_bytes``).
    """

    name: str
    touch_path: bool

    def attach(self, tree: RadixTree) -> None: ...

    def node_changed(self, node: TreeNode) -> None: ...

    def node_removed(self, node: TreeNode) -> None: ...

    def select_victim(self) -> TreeNode | None: ...

    def on_hit(self, match: MatchResult) -> None:
        """Stamp what a lookup's hit used (the cache ticks the clock first)."""
        ...

    def on_insert(self, result: InsertResult) -> None:
        """Stamp what an insert walked through (the request's path is still pinned)."""
        ...

    def trim_path(self, result: InsertResult) -> int:
        """After an insert, drop states the policy caps; the number dropped."""
        ...

    def fresh(self) -> EvictionPolicy:
        """An unattached policy with the same parameters."""
        ...


class _LazyHeap:
    """A heap of ``(key, node_id, version, node)`` whose stale entries are skipped.

    An entry is live while its node is alive, still a candidate of the owning
    policy and has not changed since it was pushed (same ``version``).
    """

    __slots__ = ("entries", "is_live")

    def __init__(self, is_live: Callable[[tuple], bool]) -> None:
        self.entries: list[tuple] = []
        self.is_live = is_live

    def push(self, key: float, node: TreeNode) -> None:
        heapq.heappush(self.entries, (key, node.id, node.version, node))

    def top(self) -> tuple | None:
        entries = self.entries
        while entries and not self.is_live(entries[0]):
            heapq.heappop(entries)
        return entries[0] if entries else None

    def ascending(self) -> Iterator[tuple]:
        """Live entries in key order, without popping (best-first walk of the heap array)."""
        entries = self.entries
        if not entries:
            return
        frontier = [(entries[0], 0)]
        size = len(entries)
        while frontier:
            entry, i = heapq.heappop(frontier)
            if self.is_live(entry):
                yield entry
            for child in (2 * i + 1, 2 * i + 2):
                if child < size:
                    heapq.heappush(frontier, (entries[child], child))

    def rebuild(self, entries: list[tuple]) -> None:
        heapq.heapify(entries)
        self.entries = entries


class _CandidateIndex:
    """Shared bookkeeping: the candidate set, when to rebuild the heaps, default stamps."""

    name: str = ""
    touch_path: bool = False

    def __init__(self) -> None:
        self.tree: RadixTree | None = None
        self.candidates: set[TreeNode] = set()

    def is_candidate(self, node: TreeNode) -> bool:
        raise NotImplementedError

    def _push(self, node: TreeNode) -> None:
        raise NotImplementedError

    def _heaps(self) -> list[_LazyHeap]:
        raise NotImplementedError

    def _live(self, entry: tuple) -> bool:
        node = entry[3]
        return node.alive and entry[2] == node.version and node in self.candidates

    def attach(self, tree: RadixTree) -> None:
        self.tree = tree
        tree.listener = self
        self.candidates.clear()
        for heap in self._heaps():
            heap.entries.clear()
        for node in tree.nodes():
            self.node_changed(node)

    def node_changed(self, node: TreeNode) -> None:
        if self.is_candidate(node):
            self.candidates.add(node)
            self._push(node)
            if len(self._heaps()[0].entries) > 2 * len(self.candidates) + 64:
                self._rebuild()
        else:
            self.candidates.discard(node)

    def node_removed(self, node: TreeNode) -> None:
        self.candidates.discard(node)

    def _rebuild(self) -> None:
        for heap in self._heaps():
            heap.entries.clear()
        for node in self.candidates:
            self._push(node)
        for heap in self._heaps():
            heap.rebuild(heap.entries)

    def on_hit(self, match: MatchResult) -> None:
        """The whole matched path (``touch_path``), else only the node the hit used."""
        assert self.tree is not None
        if self.touch_path:
            self.tree.touch(match.path)
        elif not match.hit_node.is_root:
            self.tree.touch([match.hit_node])

    def on_insert(self, result: InsertResult) -> None:
        if self.touch_path:
            assert self.tree is not None
            self.tree.touch(result.path)

    def trim_path(self, result: InsertResult) -> int:
        return 0


class LRUEviction(_CandidateIndex):
    """Least recently used leaf first (SGLang+, vLLM+); hits touch the whole path."""

    def __init__(self, name: str = "lru") -> None:
        super().__init__()
        self.name = name
        self.touch_path = True
        self._by_time = _LazyHeap(self._live)

    def is_candidate(self, node: TreeNode) -> bool:
        return not node.children and node.pins == 0 and not node.is_root

    def _push(self, node: TreeNode) -> None:
        self._by_time.push(node.last_access, node)

    def _heaps(self) -> list[_LazyHeap]:
        return [self._by_time]

    def select_victim(self) -> TreeNode | None:
        entry = self._by_time.top()
        return entry[3] if entry is not None else None

    def fresh(self) -> LRUEviction:
        return LRUEviction(self.name)


class _ScoredIndex(_CandidateIndex):
    """Argmin of ``recency + alpha * efficiency`` (both min-max normalised) over the
    candidates, found with Fagin's threshold algorithm (see the module docstring).

    Subclasses say who is a candidate, what ``efficiency`` is, and which
    timestamp (``_time``) recency reads.
    """

    _time = attrgetter("last_access")

    def __init__(self, alpha: float, name: str) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.name = name
        self.alpha = alpha
        self._time_min = _LazyHeap(self._live)
        self._time_max = _LazyHeap(self._live)
        self._eff_min = _LazyHeap(self._live)
        self._eff_max = _LazyHeap(self._live)

    def efficiency(self, node: TreeNode) -> float:
        raise NotImplementedError

    def _push(self, node: TreeNode) -> None:
        eff = self.efficiency(node)
        t = self._time(node)
        self._time_min.push(t, node)
        self._time_max.push(-t, node)
        self._eff_min.push(eff, node)
        self._eff_max.push(-eff, node)

    def _heaps(self) -> list[_LazyHeap]:
        return [self._time_min, self._time_max, self._eff_min, self._eff_max]

    def scorer(self) -> Callable[[TreeNode], float] | None:
        """The utility function under the current normalisation (None if no candidates)."""
        parts = self._normalisers()
        if parts is None:
            return None
        norm_time, norm_eff = parts
        alpha, time_of = self.alpha, self._time
        return lambda node: norm_time(time_of(node)) + alpha * norm_eff(self.efficiency(node))

    def _normalisers(
        self,
    ) -> tuple[Callable[[float], float], Callable[[float], float]] | None:
        lo_t, hi_t = self._time_min.top(), self._time_max.top()
        lo_e, hi_e = self._eff_min.top(), self._eff_max.top()
        if lo_t is None or hi_t is None or lo_e is None or hi_e is None:
            return None
        assert self.tree is not None
        now = self.tree.clock + 1  # recency 1/(now - t) stays finite for t == clock
        r_lo, r_hi = 1.0 / (now - lo_t[0]), 1.0 / (now + hi_t[0])
        e_lo, e_hi = lo_e[0], -hi_e[0]
        many = len(self.candidates) >= 2

        # Min-max normalisation; a constant (or single) value maps to 1, as in Marconi.
        def norm_time(t: float) -> float:
            if many and r_hi > r_lo:
                return (1.0 / (now - t) - r_lo) / (r_hi - r_lo)
            return 1.0

        def norm_eff(e: float) -> float:
            if many and e_hi > e_lo:
                return (e - e_lo) / (e_hi - e_lo)
            return 1.0

        return norm_time, norm_eff

    def select_victim(self) -> TreeNode | None:
        if not self.candidates:
            return None
        if self.alpha == 0:
            return self._time_min.top()[3]
        norm_time, norm_eff = self._normalisers()
        alpha, time_of = self.alpha, self._time
        by_time, by_eff = self._time_min.ascending(), self._eff_min.ascending()
        best: tuple[float, int, int] | None = None
        victim: TreeNode | None = None
        seen: set[int] = set()
        while True:
            a, b = next(by_time, None), next(by_eff, None)
            if a is None or b is None:
                break  # one order is exhausted, so every candidate has been scored
            for entry in (a, b):
                node = entry[3]
                if node.id in seen:
                    continue
                seen.add(node.id)
                eff = entry[0] if entry is b else self.efficiency(node)
                t = time_of(node)
                key = (norm_time(t) + alpha * norm_eff(eff), t, node.id)
                if best is None or key < best:
                    best, victim = key, node
            # Unseen nodes are no older than ``a`` and no more efficient than ``b``,
            # so none scores below ``bound``. Stopping only when strictly below
            # also settles exact ties by (last access, id), whatever the heaps'
            # layout, so a replayed copy of the cache decides the same way.
            bound = norm_time(a[0]) + alpha * norm_eff(b[0])
            if best is not None and best[0] < bound:
                break
        return victim


class UtilityEviction(_ScoredIndex):
    """Marconi's FLOP-aware eviction; see the module docstring.

    Args:
        spec: the model, for FLOPs saved and bytes of a node.
        alpha: weight of FLOP efficiency against recency (0 = recency only).
            An :class:`~thrifty.marconi.tuner.AlphaTuner` may change it online.
    """

    def __init__(self, spec: ModelSpec, alpha: float = 0.0, name: str = "utility") -> None:
        super().__init__(alpha, name)
        self.spec = spec
        self.touch_path = False

    def is_candidate(self, node: TreeNode) -> bool:
        return len(node.children) <= 1 and node.pins == 0 and not node.is_root

    def efficiency(self, node: TreeNode) -> float:
        """FLOPs the node's checkpoint saves over its parent's, per byte (see ModelSpec)."""
        return self.spec.flop_efficiency(node.start, node.depth)

    def fresh(self) -> UtilityEviction:
        return UtilityEviction(self.spec, self.alpha, self.name)


# --------------------------------------------------------------------------- today's engines


def replay_length(node: TreeNode) -> int:
    """Tokens a hit must recompute if ``node``'s state goes: back to the nearest
    ancestor that holds a checkpoint (SegLen's segment length)."""
    above = node.parent
    while above is not None and not above.is_root and above.checkpoint is None:
        above = above.parent
    return node.depth - (above.depth if above is not None else 0)


class _StateLRU(_CandidateIndex):
    """Nodes holding a checkpoint, least recently used state first (SGLang's Mamba list)."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "state-lru"
        self._by_time = _LazyHeap(self._live)

    def is_candidate(self, node: TreeNode) -> bool:
        return node.checkpoint is not None and node.pins == 0 and not node.is_root

    def _push(self, node: TreeNode) -> None:
        self._by_time.push(node.state_access, node)

    def _heaps(self) -> list[_LazyHeap]:
        return [self._by_time]

    def select_victim(self) -> TreeNode | None:
        entry = self._by_time.top()
        return entry[3] if entry is not None else None

    def fresh(self) -> _StateLRU:
        return _StateLRU()


class SGLangEviction:
    """Today's SGLang ``MambaRadixCache``: KV and Mamba states on two LRU lists.

    Follows sgl-project/sglang ``mem_cache/mamba_radix_cache.py`` @00df707e
    (``evict_full``, ``evict_mamba``, ``_iteratively_delete_tombstone_leaf``)
    with PR #31643 (merged; ``unified_cache/components/mamba.py`` @00b5ed64
    ``refresh_lru`` does the same, PR #31648) and PR #31230
    (``--mamba-max-states-per-path``, ``_evict_excess_path_states``):

    * two pools, each with its own budget (the cache's ``state_capacity_bytes``):
      :meth:`select_victim` frees KV: the least recently used *leaf* (its KV and
      state; a parent left without state or children goes with it);
      :meth:`select_state_victim` frees a state: the least recently used node
      holding one, leaf or not. An inner node keeps its KV as a *tombstone*, and
      a match is valid only at a node with a live state;
    * a hit refreshes the KV list along the whole hit path but the state list
      only at the node whose state it used (PR #31643: the hit rate went from
      0.61 to 0.83 on multi-turn sessions); an insert refreshes the KV list
      along its path and leaves existing states alone (new ones enter at the
      front);
    * ``max_states_per_path`` (default ``None``, SGLang's ``-1``): after an
      insert, states beyond the cap on the root-to-tail path are dropped
      shallowest first, sparing the tail, forks, leaves and pinned nodes.

    One simplification: a tombstone with one child merges into it here and
    hands over its newer KV timestamp; SGLang keeps the tombstone as its own
    node, so only the KV order of such a leaf differs.
    """

    touch_path = True

    def __init__(self, max_states_per_path: int | None = None, name: str = "sglang") -> None:
        if max_states_per_path is not None and max_states_per_path < 1:
            raise ValueError(f"max_states_per_path must be >= 1 or None, got {max_states_per_path}")
        self.name = name
        self.max_states_per_path = max_states_per_path
        self.tree: RadixTree | None = None
        self.kv_index, self.state_index = self._indexes()

    def _indexes(self) -> tuple[_CandidateIndex, _CandidateIndex]:
        return LRUEviction("kv-lru"), _StateLRU()

    def attach(self, tree: RadixTree) -> None:
        self.tree = tree
        self.kv_index.attach(tree)
        self.state_index.attach(tree)
        tree.listener = self

    def node_changed(self, node: TreeNode) -> None:
        self.kv_index.node_changed(node)
        self.state_index.node_changed(node)

    def node_removed(self, node: TreeNode) -> None:
        self.kv_index.node_removed(node)
        self.state_index.node_removed(node)

    def select_victim(self) -> TreeNode | None:
        return self.kv_index.select_victim()

    def select_state_victim(self) -> TreeNode | None:
        return self.state_index.select_victim()

    def on_hit(self, match: MatchResult) -> None:
        assert self.tree is not None
        if not match.hit_node.is_root:
            self.tree.touch(match.hit_path)
            self.tree.touch_state([match.hit_node])

    def on_insert(self, result: InsertResult) -> None:
        assert self.tree is not None
        self.tree.touch(result.path)

    def trim_path(self, result: InsertResult) -> int:
        cap, tree = self.max_states_per_path, self.tree
        assert tree is not None
        tail = next((n for n in reversed(result.path) if n.alive and n.checkpoint), None)
        if cap is None or tail is None:
            return 0
        holders, node = [], tail
        while not node.is_root:
            if node.checkpoint is not None:
                holders.append(node)
            node = node.parent
        excess, dropped = len(holders) - cap, 0
        for node in reversed(holders):  # shallowest first
            if excess <= 0 or node is tail:
                break
            if node.pins or len(node.children) != 1:
                continue  # forks, leaves and pinned nodes keep their states
            tree.evict(node)
            excess -= 1
            dropped += 1
        return dropped

    def fresh(self) -> SGLangEviction:
        return SGLangEviction(self.max_states_per_path, self.name)


class _SegLenIndex(_ScoredIndex):
    """SegLen's score over KV leaves (``holders=False``) or state holders (``True``)."""

    def __init__(self, alpha: float, holders: bool) -> None:
        super().__init__(alpha, "seglen-states" if holders else "seglen-kv")
        self.holders = holders
        self._time = attrgetter("state_access" if holders else "last_access")

    def is_candidate(self, node: TreeNode) -> bool:
        if node.pins or node.is_root:
            return False
        return node.checkpoint is not None if self.holders else not node.children

    def efficiency(self, node: TreeNode) -> float:
        return float(replay_length(node))

    def fresh(self) -> _SegLenIndex:
        return _SegLenIndex(self.alpha, self.holders)


class SegLenEviction(SGLangEviction):
    """SegLen (sgl-project/sglang PR #22172, closed unmerged; abdelfattah-lab's
    blog "Rethinking Prefix Caching for Hybrid LLMs"): ``--radix-eviction-policy
    seglen --seglen-eff-weight 0.85`` on ``MambaRadixCache`` (``extra_buffer``).

    A model-agnostic stand-in for Marconi's FLOP efficiency: both of SGLang's
    lists (:class:`SGLangEviction`) evict by ``w * segment + (1 - w) * recency``
    instead of LRU, where a node's segment is :func:`replay_length` (the tokens
    a hit would recompute without its state) and ``w = eff_weight``. A match
    refreshes only the node it used, in both lists; the insert walk refreshes
    every node it passes, as SGLang before PR #31643 did.

    The PR text names the terms but the stored copy does not show how they are
    normalised; here both are min-max normalised over the candidates and
    recency is ``1 / (now - last use)``, as Marconi's utility, so the ranking is
    Marconi's with ``alpha = w / (1 - w)`` and segment length for efficiency.
    """

    def __init__(
        self,
        eff_weight: float = 0.85,
        max_states_per_path: int | None = None,
        name: str = "seglen",
    ) -> None:
        if not 0 <= eff_weight < 1:
            raise ValueError(f"eff_weight must lie in [0, 1), got {eff_weight}")
        self.eff_weight = eff_weight
        super().__init__(max_states_per_path, name)

    def _indexes(self) -> tuple[_CandidateIndex, _CandidateIndex]:
        alpha = self.eff_weight / (1 - self.eff_weight)
        return _SegLenIndex(alpha, holders=False), _SegLenIndex(alpha, holders=True)

    def on_hit(self, match: MatchResult) -> None:
        assert self.tree is not None
        if not match.hit_node.is_root:
            self.tree.touch([match.hit_node])
            self.tree.touch_state([match.hit_node])

    def on_insert(self, result: InsertResult) -> None:
        assert self.tree is not None
        self.tree.touch(result.path)
        self.tree.touch_state(result.path)

    def fresh(self) -> SegLenEviction:
        return SegLenEviction(self.eff_weight, self.max_states_per_path, self.name)


class VLLMEviction(_CandidateIndex):
    """vLLM's one LRU free queue of blocks (``BlockPool``'s free queue of blocks no
    request holds, and ``SingleTypeKVCacheManager.free`` releasing a request's
    blocks tail first, as summarised in the project's Marconi note, section 4;
    no compute awareness: the Mamba block-freeing policy of issue #26201 is open).

    KV and Mamba blocks share one pool and one queue. A request's blocks go to
    the back of the queue when it finishes, tail first, so a path's leaf goes
    before its ancestors' KV; but the Mamba blocks a request moved past (the
    states at earlier block ends) were released while it ran, as align mode
    keeps only the running state's block (our reading of PR #30877 and
    #43628), and are used again only by a hit that resumes from them. So the candidates are
    the leaves, ordered by when their KV was last used, and the inner nodes'
    checkpoints, ordered by when the state was last used; evicting an inner
    checkpoint keeps its KV (the next block end's state may still hit). Ties
    (one request's states share a tick) go to the shallower node, freed first.
    """

    touch_path = True

    def __init__(self, name: str = "vllm-lru") -> None:
        super().__init__()
        self.name = name
        self._by_time = _LazyHeap(self._live)

    def is_candidate(self, node: TreeNode) -> bool:
        return node.checkpoint is not None and node.pins == 0 and not node.is_root

    def _push(self, node: TreeNode) -> None:
        self._by_time.push(node.state_access if node.children else node.last_access, node)

    def _heaps(self) -> list[_LazyHeap]:
        return [self._by_time]

    def select_victim(self) -> TreeNode | None:
        entry = self._by_time.top()
        return entry[3] if entry is not None else None

    def on_hit(self, match: MatchResult) -> None:
        assert self.tree is not None
        if not match.hit_node.is_root:
            self.tree.touch(match.hit_path)
            self.tree.touch_state([match.hit_node])

    def fresh(self) -> VLLMEviction:
        return VLLMEviction(self.name)
