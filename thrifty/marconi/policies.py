"""Admission (where to checkpoint) and eviction (what to free) policies.

Admission decides which SSM states a request stores:

* :class:`MarconiAdmission` (Marconi and SGLang+): the state after the last
  decoded token, plus, when the input shares more with the tree than a hit can
  reuse, the state at that branch point (speculative insertion: the branch is
  found by matching before prefill, and prefill also emits the state there).
  At most two checkpoints per request.
* :class:`BlockAdmission` (vLLM+): a checkpoint at every ``block_size``-th
  token, all kept; only whole blocks are cached, as vLLM hashes full blocks.

Eviction decides what goes when the byte budget would be exceeded:

* :class:`LRUEviction` (SGLang+, vLLM+): the least recently used leaf; a hit
  touches its whole matched path.
* :class:`UtilityEviction` (Marconi): among nodes with at most one child, the
  lowest ``recency + alpha * flop_efficiency`` (both min-max normalised over the
  candidates, recency = 1 / (now - last access)); a hit touches only the node
  it used. A leaf is removed; a single-child node loses its checkpoint and
  merges into its child.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from thrifty.marconi.model import ModelSpec
from thrifty.marconi.tree import MatchResult, RadixTree, TreeNode

__all__ = [
    "AdmissionPolicy",
    "BlockAdmission",
    "EvictionPolicy",
    "LRUEviction",
    "MarconiAdmission",
    "UtilityEviction",
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
    """vLLM+: a checkpoint at every ``block_size`` tokens of input + output."""

    block_size: int = 32
    name: str = "block"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def checkpoint_positions(
        self, match: MatchResult, num_input: int, num_output: int
    ) -> list[int]:
        return list(range(self.block_size, num_input + num_output + 1, self.block_size))


# --------------------------------------------------------------------------- eviction


class EvictionPolicy(Protocol):
    """Listens to a tree, keeps its own candidate index and picks victims."""

    name: str
    touch_path: bool

    def attach(self, tree: RadixTree) -> None: ...

    def node_changed(self, node: TreeNode) -> None: ...

    def node_removed(self, node: TreeNode) -> None: ...

    def select_victim(self) -> TreeNode | None: ...

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
    """Shared bookkeeping: the candidate set and when to rebuild the heaps."""

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


class UtilityEviction(_CandidateIndex):
    """Marconi's FLOP-aware eviction; see the module docstring.

    Args:
        spec: the model, for FLOPs saved and bytes of a node.
        alpha: weight of FLOP efficiency against recency (0 = recency only).
            An :class:`~thrifty.marconi.tuner.AlphaTuner` may change it online.
    """

    def __init__(self, spec: ModelSpec, alpha: float = 0.0, name: str = "utility") -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.name = name
        self.spec = spec
        self.alpha = alpha
        self.touch_path = False
        self._time_min = _LazyHeap(self._live)
        self._time_max = _LazyHeap(self._live)
        self._eff_min = _LazyHeap(self._live)
        self._eff_max = _LazyHeap(self._live)

    def is_candidate(self, node: TreeNode) -> bool:
        return len(node.children) <= 1 and node.pins == 0 and not node.is_root

    def efficiency(self, node: TreeNode) -> float:
        """FLOPs the node's checkpoint saves over its parent's, per byte (see ModelSpec)."""
        return self.spec.flop_efficiency(node.start, node.depth)

    def _push(self, node: TreeNode) -> None:
        eff = self.efficiency(node)
        t = node.last_access
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
        alpha = self.alpha
        return lambda node: norm_time(node.last_access) + alpha * norm_eff(self.efficiency(node))

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
        alpha = self.alpha
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
                key = (
                    norm_time(node.last_access) + alpha * norm_eff(eff),
                    node.last_access,
                    node.id,
                )
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

    def fresh(self) -> UtilityEviction:
        return UtilityEviction(self.spec, self.alpha, self.name)
