"""Placement search: the most recoverable placement for given replica counts.

What "optimal" means here
-------------------------
Let ``P(k)`` be the probability that every expert keeps a live replica when
``k`` of the ``N`` nodes fail, all ``k``-subsets equally likely
(:mod:`thrifty.lazarus.recovery`). Among the placements that

* fill every slot with the given replica counts ``r`` (several replicas of an
  expert may share a node), and
* put each expert on at least ``min(f, r_e, N)`` distinct nodes
  (``f = min_distinct``; the fault-tolerance promise of Eq. 1's minimum),

a placement is *optimal* when its vector ``(P(k_1), P(k_2), ...)`` is
lexicographically largest, for the failure counts ``failures = (k_1, k_2, ...)``.
The default is ``k = 1, 2, ..., N-1`` (``1..4`` above 16 nodes, where the full
vector is not computable): first lose as rarely as possible to one failure,
then to two, and so on. That order is what expected loss converges to when
nodes fail independently with a small probability ``q``: ``k`` simultaneous
failures have weight ``~q^k``, so each ``k`` dominates all larger ones.
Pass ``failures=(k,)`` to maximise ``P(k)`` for one ``k`` instead (the paper's
statement, "``R`` random survivors").

The distinct-node constraint costs nothing under the default order when every
``r_e >= f`` and ``N >= f`` (as Eq. 1 guarantees): the rotation plan reaches
``P(k) = 1`` for all ``k < f``, so every lexicographic optimum must too, which
means ``f`` distinct holders for every expert.

How it is found
---------------
1. Candidates by construction: the paper's MRO, MRO repaired to honour the
   distinct-node constraint, and the rotation (spread) plan; keep the best.
2. Local search from it: swap two replicas on different nodes while the
   score improves (first improvement, in a fixed order, within
   ``max_evaluations``) - deterministic, so every rank gets the same plan.
3. Small instances (``N <= exact_max_nodes``, default 12): exact branch and
   bound, seeded with step 2's placement, which proves optimality or returns
   the best found within ``max_branches`` (default 50,000: about a second in
   the worst cases measured; most instances up to 12 nodes are proven in
   milliseconds). It assigns experts least replicated first (each as a
   multiplicity vector over nodes) and
   * breaks node symmetry: nodes with identical contents so far are
     interchangeable, so their multiplicities must be non-increasing;
   * breaks expert symmetry: of two experts with equal ``r``, the first's
     vector is lexicographically >= the second's (both are properties of the
     lexicographically largest member of each orbit, so no orbit is lost);
   * bounds: placing more experts only kills more failure sets, so the score
     of the experts placed so far bounds every completion; a branch whose
     bound is not above the incumbent is cut.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from math import comb

from thrifty.lazarus.placement import (
    Placement,
    _check,
    enforce_distinct_nodes,
    mro_placement,
    rotation_placement,
    sorted_experts,
)
from thrifty.lazarus.recovery import RecoveryScorer

__all__ = [
    "PlacementResult",
    "default_failures",
    "improve_placement",
    "optimal_placement",
    "place_experts",
    "search_placement",
]

log = logging.getLogger(__name__)

FULL_VECTOR_MAX_NODES = 16
LARGE_CLUSTER_FAILURES = 4


@dataclass(frozen=True)
class PlacementResult:
    """A placement with its score and how it was found.

    Attributes:
        placement: the chosen placement.
        score: recoverable failure sets for each ``k`` in ``failures``
            (divide by ``comb(N, k)`` for probabilities).
        failures: the failure counts ranked, most important first.
        source: ``"mro"``, ``"mro_repaired"``, ``"rotation"``, ``"local_search"``
            or ``"exact"``: which step produced the placement.
        proven_optimal: True when the exact search finished within its budget.
        exact_score: False when the score came from sampled failure sets.
        evaluations: placements scored (local search) plus branches (exact).
    """

    placement: Placement
    score: tuple[int, ...]
    failures: tuple[int, ...]
    source: str
    proven_optimal: bool
    exact_score: bool = True
    evaluations: int = 0

    def probabilities(self) -> tuple[float, ...]:
        """``score`` as probabilities: ``P(k)`` for each ``k`` in ``failures``."""
        n = self.placement.num_nodes
        return tuple(s / comb(n, k) for s, k in zip(self.score, self.failures, strict=True))


def default_failures(nodes: int) -> tuple[int, ...]:
    """``1..N-1`` up to 16 nodes, else ``1..4``: see the module docstring."""
    if nodes <= FULL_VECTOR_MAX_NODES:
        return tuple(range(1, nodes)) or (1,)
    return tuple(range(1, LARGE_CLUSTER_FAILURES + 1))


def place_experts(
    replicas: Sequence[int],
    nodes: int,
    slots_per_node: int,
    *,
    min_distinct: int = 2,
    failures: Sequence[int] | None = None,
    exact_max_nodes: int = 12,
    max_branches: int = 50_000,
    max_evaluations: int = 2_000,
) -> Placement:
    """The most recoverable placement found for replica counts ``replicas``.

    See the module docstring for what optimal means and how it is searched;
    :func:`search_placement` returns the score and provenance as well.

    Example::

        >>> sorted(place_experts([2, 2, 2], nodes=3, slots_per_node=2).nodes)  # a rotation
        [(0, 1), (0, 2), (1, 2)]
    """
    return search_placement(
        replicas,
        nodes,
        slots_per_node,
        min_distinct=min_distinct,
        failures=failures,
        exact_max_nodes=exact_max_nodes,
        max_branches=max_branches,
        max_evaluations=max_evaluations,
    ).placement


def search_placement(
    replicas: Sequence[int],
    nodes: int,
    slots_per_node: int,
    *,
    min_distinct: int = 2,
    failures: Sequence[int] | None = None,
    exact_max_nodes: int = 12,
    max_branches: int = 50_000,
    max_evaluations: int = 2_000,
) -> PlacementResult:
    """Like :func:`place_experts`, returning the :class:`PlacementResult`."""
    counts = _check(replicas, nodes, slots_per_node)
    ks = tuple(failures) if failures is not None else default_failures(nodes)
    scorer = RecoveryScorer(nodes, ks)
    targets = _targets(counts, nodes, min_distinct)

    plain = mro_placement(counts, nodes, slots_per_node)
    candidates = [
        ("mro", plain),
        ("mro_repaired", enforce_distinct_nodes(plain, min_distinct)),
        ("rotation", rotation_placement(counts, nodes, slots_per_node)),
    ]
    best: PlacementResult | None = None
    for source, candidate in candidates:
        if not _meets(candidate, targets):
            continue
        score = scorer.score(candidate.holder_masks)
        if best is None or score > best.score:
            best = PlacementResult(candidate, score, ks, source, False, scorer.exact)
    assert best is not None  # the rotation plan always meets the targets
    improved = improve_placement(
        best.placement,
        failures=ks,
        min_distinct=min_distinct,
        max_evaluations=max_evaluations,
        scorer=scorer,
    )
    evaluations = improved.evaluations
    if improved.score > best.score:
        best = improved
    if nodes <= exact_max_nodes and scorer.uses_table:
        exact = optimal_placement(
            counts,
            nodes,
            slots_per_node,
            failures=ks,
            min_distinct=min_distinct,
            incumbent=best.placement,
            max_branches=max_branches,
        )
        evaluations += exact.evaluations
        source = "exact" if exact.score > best.score else best.source
        best = PlacementResult(
            exact.placement, exact.score, ks, source, exact.proven_optimal, True, evaluations
        )
        if not exact.proven_optimal:
            log.info(
                "exact placement search stopped after %d branches (N=%d, c=%d, r=%s); "
                "keeping the best found",
                max_branches,
                nodes,
                slots_per_node,
                counts,
            )
    return PlacementResult(
        best.placement,
        best.score,
        ks,
        best.source,
        best.proven_optimal,
        scorer.exact,
        evaluations,
    )


def _targets(counts: Sequence[int], nodes: int, min_distinct: int) -> list[int]:
    if min_distinct < 1:
        raise ValueError(f"min_distinct={min_distinct}: expected >= 1")
    return [min(min_distinct, r, nodes) for r in counts]


def _meets(placement: Placement, targets: Sequence[int]) -> bool:
    return all(m.bit_count() >= t for m, t in zip(placement.holder_masks, targets, strict=True))


# --- local search ------------------------------------------------------------------


def improve_placement(
    placement: Placement,
    *,
    failures: Sequence[int] | None = None,
    min_distinct: int = 2,
    max_evaluations: int = 2_000,
    scorer: RecoveryScorer | None = None,
) -> PlacementResult:
    """Swap pairs of replicas between nodes while the recovery score improves.

    A move exchanges one replica of expert ``a`` on node ``i`` with one of
    expert ``b`` on node ``j``; only ``a``'s and ``b``'s holder sets change.
    Moves are tried in a fixed order and the first improving one is taken
    (then the scan continues from there), until a full pass finds none or
    ``max_evaluations`` placements have been scored. Moves that break the
    distinct-node targets are skipped. Above the table size only moves of
    experts that ``max(failures)`` failures can kill are tried: the others
    cannot raise the score.
    """
    nodes = placement.num_nodes
    ks = tuple(failures) if failures is not None else default_failures(nodes)
    if scorer is None:
        scorer = RecoveryScorer(nodes, ks)
    targets = _targets(placement.replicas, nodes, min_distinct)
    count = placement.replica_matrix().tolist()  # [node][expert]
    masks = list(placement.holder_masks)
    score = scorer.score(masks)
    evaluations = examined = 0
    improved_any = False
    max_examined = 50 * max_evaluations
    while evaluations < max_evaluations and examined < max_examined:
        improved_in_pass = False
        for i, a, j, b in _moves(count, masks, scorer):
            if evaluations >= max_evaluations or examined >= max_examined:
                break
            examined += 1
            if a == b or count[i][a] == 0 or count[j][b] == 0:
                continue  # stale: an earlier move in this pass changed these nodes
            new_a = masks[a] | 1 << j
            if count[i][a] == 1:
                new_a &= ~(1 << i)
            new_b = masks[b] | 1 << i
            if count[j][b] == 1:
                new_b &= ~(1 << j)
            if new_a == masks[a] and new_b == masks[b]:
                continue
            if new_a.bit_count() < targets[a] or new_b.bit_count() < targets[b]:
                continue
            trial = masks.copy()
            trial[a], trial[b] = new_a, new_b
            evaluations += 1
            trial_score = scorer.score(trial)
            if trial_score > score:
                score, masks = trial_score, trial
                count[i][a] -= 1
                count[j][a] += 1
                count[j][b] -= 1
                count[i][b] += 1
                improved_in_pass = improved_any = True
        if not improved_in_pass:
            break
    result = _from_counts(count, len(masks))
    source = "local_search" if improved_any else "start"
    return PlacementResult(result, score, ks, source, False, scorer.exact, evaluations)


def _moves(
    count: list[list[int]], masks: list[int], scorer: RecoveryScorer
) -> Iterator[tuple[int, int, int, int]]:
    """Swap moves ``(i, a, j, b)`` in a fixed order, read from the current state as it changes.

    Small clusters: every pair of nodes ``i < j`` and every pair of experts on
    them. Large clusters: only moves of a replica of an expert that
    ``max(failures)`` failures can kill (the others cannot raise the score).
    """
    nodes = len(count)
    if scorer.uses_table:
        for i in range(nodes):
            for j in range(i + 1, nodes):
                for a in [e for e, n in enumerate(count[i]) if n]:
                    for b in [e for e, n in enumerate(count[j]) if n]:
                        yield i, a, j, b
        return
    for a in [e for e, m in enumerate(masks) if scorer.critical(m)]:
        for i in [j for j in range(nodes) if count[j][a]]:
            for j in range(nodes):
                if j != i:
                    for b in [e for e, n in enumerate(count[j]) if n]:
                        yield i, a, j, b


def _from_counts(count: Sequence[Sequence[int]], experts: int) -> Placement:
    rows = [tuple(e for e in range(experts) for _ in range(row[e])) for row in count]
    return Placement(tuple(rows), experts)


# --- exact search ------------------------------------------------------------------


def optimal_placement(
    replicas: Sequence[int],
    nodes: int,
    slots_per_node: int,
    *,
    failures: Sequence[int] | None = None,
    min_distinct: int = 2,
    incumbent: Placement | None = None,
    max_branches: int = 1_000_000,
) -> PlacementResult:
    """Exact branch and bound for small instances (see the module docstring).

    ``proven_optimal`` is True when the search space was exhausted within
    ``max_branches`` expert assignments; otherwise the best placement seen
    (at least as good as ``incumbent``) is returned.
    """
    counts = _check(replicas, nodes, slots_per_node)
    ks = tuple(failures) if failures is not None else default_failures(nodes)
    scorer = RecoveryScorer(nodes, ks)
    if not scorer.uses_table:
        raise ValueError(f"exact search needs a small cluster; {nodes} nodes is too many")
    targets = _targets(counts, nodes, min_distinct)
    order = sorted_experts(counts)
    experts = len(counts)

    best_vectors: list[tuple[int, ...]] | None = None
    if incumbent is None or not _meets(incumbent, targets):
        # The rotation plan always meets the targets: a feasible answer even if the budget ends.
        incumbent = rotation_placement(counts, nodes, slots_per_node)
    if incumbent.replicas != tuple(counts) or incumbent.num_nodes != nodes:
        raise ValueError("incumbent does not match the replica counts and node count")
    best_score: tuple[int, ...] = scorer.score(incumbent.holder_masks)

    free = [slots_per_node] * nodes
    signature: list[tuple[int, ...]] = [()] * nodes
    chosen: list[tuple[int, ...]] = []
    branches = 0
    exhausted = True

    def vectors(total: int, bound: tuple[int, ...] | None) -> Iterator[tuple[int, ...]]:
        previous_in_class: list[int | None] = []
        last_seen: dict[tuple[int, ...], int] = {}
        for j in range(nodes):
            previous_in_class.append(last_seen.get(signature[j]))
            last_seen[signature[j]] = j
        capacity_after = [0] * (nodes + 1)
        for j in range(nodes - 1, -1, -1):
            capacity_after[j] = capacity_after[j + 1] + free[j]
        vector = [0] * nodes

        def fill(j: int, left: int, tight: bool) -> Iterator[tuple[int, ...]]:
            if j == nodes:
                if left == 0:
                    yield tuple(vector)
                return
            if capacity_after[j] < left:
                return
            top = min(free[j], left)
            previous = previous_in_class[j]
            if previous is not None:
                top = min(top, vector[previous])
            if tight and bound is not None:
                top = min(top, bound[j])
            for value in range(top, -1, -1):
                vector[j] = value
                still_tight = tight and bound is not None and value == bound[j]
                yield from fill(j + 1, left - value, still_tight)
            vector[j] = 0

        yield from fill(0, total, True)

    def search(position: int, alive: int) -> None:
        nonlocal best_score, best_vectors, branches, exhausted
        if position == experts:
            score = scorer.score_alive(alive)
            if score > best_score:
                best_score, best_vectors = score, list(chosen)
            return
        e = order[position]
        same_as_previous = position > 0 and counts[order[position - 1]] == counts[e]
        bound = chosen[-1] if same_as_previous else None
        for vector in vectors(counts[e], bound):
            mask = 0
            for j, value in enumerate(vector):
                if value:
                    mask |= 1 << j
            if mask.bit_count() < targets[e]:
                continue
            branches += 1
            if branches > max_branches:
                exhausted = False
                return
            next_alive = alive & scorer.hits(mask)
            if scorer.score_alive(next_alive) <= best_score:
                continue
            for j, value in enumerate(vector):
                free[j] -= value
            saved = list(signature)
            for j in range(nodes):
                signature[j] = (*signature[j], vector[j])
            chosen.append(vector)
            search(position + 1, next_alive)
            chosen.pop()
            signature[:] = saved
            for j, value in enumerate(vector):
                free[j] += value
            if not exhausted:
                return

    search(0, (1 << (1 << nodes)) - 1)

    if best_vectors is None:
        return PlacementResult(incumbent, best_score, ks, "incumbent", exhausted, True, branches)
    count = [[0] * experts for _ in range(nodes)]
    for e, vector in zip(order, best_vectors, strict=True):
        for j, value in enumerate(vector):
            count[j][e] = value
    placement = _from_counts(count, experts)
    return PlacementResult(placement, best_score, ks, "exact", exhausted, True, branches)
