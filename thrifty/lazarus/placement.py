"""Where the replicas go: the placement type and the constructions that build one.

A placement puts ``N * c`` replicas into ``N`` nodes of ``c`` slots each, with
expert ``e`` in ``r_e`` slots (several may share a node: that node then serves
more of the expert's tokens). What we want from it is recoverability: after
``k`` random nodes fail, every expert should still have a live replica (see
:mod:`thrifty.lazarus.recovery`). The constructions here are fast and need no
scoring; :mod:`thrifty.lazarus.placement_search` scores and improves them.

* :func:`mro_placement` - the paper's Maximum Rank Overlap (§4.1, App. A.2):
  experts sorted by replica count, cut into groups of ``c``; each group fills
  its own block of nodes, so a group's experts die together ("all eggs in one
  basket"), which keeps the number of fatal failure sets small.
* :func:`enforce_distinct_nodes` - the correction a brute-force check called
  for: when the last group is truncated MRO can put two replicas of an expert
  on one node (``N=3, c=2, r=[2,2,2]`` puts both of expert 3's on node 3, so a
  single failure loses it a third of the time). This repairs any placement so
  that each expert spans at least ``min(f, r_e, N)`` distinct nodes.
* :func:`rotation_placement` - the "spread" plan: replicas written row by row
  across the nodes, so each expert occupies a cyclic run of distinct nodes.
* :func:`compact_placement` - the "compact" plan: nodes filled one at a time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = [
    "Placement",
    "compact_placement",
    "enforce_distinct_nodes",
    "mro_placement",
    "rotation_placement",
    "sorted_experts",
]


@dataclass(frozen=True)
class Placement:
    """Expert replicas on nodes: ``nodes[j]`` lists the experts in node ``j``'s slots.

    Each node's tuple is kept sorted, so two placements that differ only in
    the order of slots within a node compare equal. Node order does matter
    (it is which physical node gets what), but recovery probability does not
    depend on it.
    """

    nodes: tuple[tuple[int, ...], ...]
    num_experts: int

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a placement needs at least one node")
        slots = len(self.nodes[0])
        canonical = []
        for j, node in enumerate(self.nodes):
            if len(node) != slots:
                raise ValueError(
                    f"node {j} has {len(node)} slots, node 0 has {slots}: all nodes need c slots"
                )
            for expert in node:
                if not 0 <= expert < self.num_experts:
                    raise ValueError(
                        f"node {j} holds expert {expert}, outside 0..{self.num_experts - 1}"
                    )
            canonical.append(tuple(sorted(int(x) for x in node)))
        object.__setattr__(self, "nodes", tuple(canonical))

    @classmethod
    def from_nodes(
        cls, nodes: Iterable[Iterable[int]], num_experts: int | None = None
    ) -> Placement:
        """Build from per-node expert lists; ``num_experts`` defaults to the largest id + 1."""
        rows = tuple(tuple(int(x) for x in node) for node in nodes)
        if num_experts is None:
            num_experts = 1 + max((x for row in rows for x in row), default=-1)
        return cls(rows, num_experts)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def slots_per_node(self) -> int:
        return len(self.nodes[0])

    @cached_property
    def replicas(self) -> tuple[int, ...]:
        """Replica count of each expert (sums to ``num_nodes * slots_per_node``)."""
        counts = Counter(x for node in self.nodes for x in node)
        return tuple(counts.get(e, 0) for e in range(self.num_experts))

    @cached_property
    def holder_masks(self) -> tuple[int, ...]:
        """Per expert, the set of nodes holding it as a bitmask (bit ``j`` = node ``j``)."""
        masks = [0] * self.num_experts
        for j, node in enumerate(self.nodes):
            for expert in node:
                masks[expert] |= 1 << j
        return tuple(masks)

    def holders(self, expert: int) -> tuple[int, ...]:
        """The distinct nodes that hold ``expert``, ascending."""
        mask = self.holder_masks[expert]
        return tuple(j for j in range(self.num_nodes) if mask >> j & 1)

    def distinct_nodes(self, expert: int) -> int:
        return self.holder_masks[expert].bit_count()

    def replica_matrix(self) -> np.ndarray:
        """``R[j, e]``: replicas of expert ``e`` on node ``j`` (int64), the dispatcher's input."""
        matrix = np.zeros((self.num_nodes, self.num_experts), dtype=np.int64)
        for j, node in enumerate(self.nodes):
            for expert in node:
                matrix[j, expert] += 1
        return matrix

    def __str__(self) -> str:
        return " | ".join(",".join(map(str, node)) for node in self.nodes)


def sorted_experts(replicas: Sequence[int]) -> list[int]:
    """Experts by ascending replica count, ties by index: the order every construction uses."""
    return sorted(range(len(replicas)), key=lambda e: (replicas[e], e))


def _check(replicas: Sequence[int], nodes: int, slots_per_node: int) -> list[int]:
    counts = [int(r) for r in replicas]
    if nodes < 1 or slots_per_node < 1:
        raise ValueError(
            f"need nodes >= 1 and slots_per_node >= 1, got {nodes} and {slots_per_node}"
        )
    if not counts:
        raise ValueError("replicas is empty: need at least one expert")
    if any(r < 1 for r in counts):
        raise ValueError(f"replicas={counts}: every expert needs at least one replica")
    if sum(counts) != nodes * slots_per_node:
        raise ValueError(
            f"replicas sum to {sum(counts)} but {nodes} nodes x {slots_per_node} slots = "
            f"{nodes * slots_per_node}: every slot must hold exactly one replica"
        )
    return counts


def mro_placement(replicas: Sequence[int], nodes: int, slots_per_node: int) -> Placement:
    """The paper's MRO placement, as published (no distinct-node repair).

    1. Sort experts by replica count (ascending) and cut them into groups of
       ``c``; a group's first (least replicated) expert is its representative.
    2. Group ``i`` gets the next ``r_rep(i)`` nodes (the last group only what
       is left, which truncates it); each of those nodes holds one replica of
       every expert in the group. With ``E <= c`` this is the paper's nested
       case: expert ``e`` on nodes ``0 .. r_e - 1``.
    3. The remaining replicas fill the vacant slots, walking the nodes
       cyclically from the first node after the groups' blocks.

    Step 3 is where the paper says only "uniformly"; the cyclic walk spreads
    an expert's leftovers over consecutive nodes. It may still put a replica
    on a node that already holds that expert (the truncated-last-group flaw);
    :func:`enforce_distinct_nodes` repairs that.
    """
    counts = _check(replicas, nodes, slots_per_node)
    order = sorted_experts(counts)
    experts = len(counts)
    content: list[list[int]] = [[] for _ in range(nodes)]
    left = list(counts)
    if experts <= slots_per_node:  # nested: S_1 ⊂ S_2 ⊂ ... (the optimal case)
        for e in order:
            for j in range(min(counts[e], nodes)):
                content[j].append(e)
                left[e] -= 1
        first_free = min(counts[order[0]], nodes) % nodes
    else:
        used = 0
        for start in range(0, experts, slots_per_node):
            group = order[start : start + slots_per_node]
            block = min(counts[group[0]], nodes - used)
            for j in range(used, used + block):
                for e in group:
                    content[j].append(e)
                    left[e] -= 1
            used += block
        first_free = used % nodes
    cursor = first_free
    for e in order:
        while left[e] > 0:
            while len(content[cursor]) >= slots_per_node:
                cursor = (cursor + 1) % nodes
            content[cursor].append(e)
            left[e] -= 1
            cursor = (cursor + 1) % nodes
    return Placement(tuple(tuple(node) for node in content), experts)


def rotation_placement(replicas: Sequence[int], nodes: int, slots_per_node: int) -> Placement:
    """Spread plan: replica ``p`` of the sorted sequence goes to node ``p mod N``, slot ``p // N``.

    Each expert's replicas are consecutive in the sequence, so they land on
    ``min(r_e, N)`` distinct nodes (a cyclic run). For ``N=3, c=2, r=[2,2,2]``
    this is the rotation ``{1,2} {2,3} {3,1}`` that survives any single failure.
    """
    counts = _check(replicas, nodes, slots_per_node)
    content: list[list[int]] = [[] for _ in range(nodes)]
    position = 0
    for e in sorted_experts(counts):
        for _ in range(counts[e]):
            content[position % nodes].append(e)
            position += 1
    return Placement(tuple(tuple(node) for node in content), len(counts))


def compact_placement(replicas: Sequence[int], nodes: int, slots_per_node: int) -> Placement:
    """Compact plan: fill node 0's slots, then node 1's, ...: each expert's replicas packed."""
    counts = _check(replicas, nodes, slots_per_node)
    sequence = [e for e in sorted_experts(counts) for _ in range(counts[e])]
    rows = [sequence[j * slots_per_node : (j + 1) * slots_per_node] for j in range(nodes)]
    return Placement(tuple(tuple(row) for row in rows), len(counts))


def enforce_distinct_nodes(placement: Placement, min_distinct: int) -> Placement:
    """Repair ``placement`` so expert ``e`` spans at least ``min(min_distinct, r_e, N)`` nodes.

    With ``f`` replicas on distinct nodes, any ``f - 1`` failures leave a
    live replica: the guarantee Eq. 1's minimum is meant to buy, which plain
    MRO can break when its last group is truncated.

    Each step takes an expert ``e`` below its target, a node ``i`` holding two
    copies of it and a node ``j`` holding none, and swaps one copy with an
    expert ``x`` on ``j`` chosen so that ``x`` keeps its distinct-node count
    (``x`` not on ``i``, or ``x`` twice on ``j``). Such an ``x`` always exists:
    otherwise node ``j``'s ``c`` distinct experts would all be among the at
    most ``c - 2`` other experts on node ``i``. So every step raises ``e``'s
    count and lowers no one's, and the repair always succeeds. Experts are
    repaired least replicated first; the swaps change as little as possible.
    """
    if min_distinct <= 1:
        return placement
    nodes, experts = placement.num_nodes, placement.num_experts
    count = placement.replica_matrix()  # [node, expert]
    replicas = placement.replicas
    target = [min(min_distinct, replicas[e], nodes) for e in range(experts)]
    distinct = (count > 0).sum(axis=0)
    for e in sorted_experts(replicas):
        while distinct[e] < target[e]:
            i = int(np.argmax(count[:, e]))  # the node with the most copies (>= 2 here)
            best: tuple[int, int, int] | None = None  # (-gain, j, x)
            for j in range(nodes):
                if count[j, e] > 0:
                    continue
                for x in np.nonzero(count[j])[0].tolist():
                    gain = int(count[i, x] == 0) - int(count[j, x] == 1)
                    if gain >= 0 and (best is None or (-gain, j, x) < best):
                        best = (-gain, j, x)
            if best is None:  # impossible by the argument above; guard the invariant
                raise AssertionError(f"no distinctness-preserving swap for expert {e}")
            _, j, x = best
            count[i, e] -= 1
            count[j, e] += 1
            count[j, x] -= 1
            count[i, x] += 1
            distinct = (count > 0).sum(axis=0)
    return _from_counts(count)


def _from_counts(count: np.ndarray) -> Placement:
    rows = []
    for j in range(count.shape[0]):
        rows.append(tuple(e for e in range(count.shape[1]) for _ in range(int(count[j, e]))))
    return Placement(tuple(rows), count.shape[1])
