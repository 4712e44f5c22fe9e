"""Placement: constructions, the exact search against brute force, and plain MRO's misses.

The brute force here is deliberately naive and independent of the library:
every placement up to node order (each node a multiset of ``c`` experts,
nodes in non-decreasing order), scored by looping over all ``2^N`` failure
sets. "Optimal" is the library's definition: the lexicographically largest
``(P(1), ..., P(N-1))``, among placements with each expert on at least
``min(f, r_e, N)`` distinct nodes.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time

import pytest

from thrifty.lazarus import Placement, allocate_replicas, place_experts, search_placement
from thrifty.lazarus.placement import (
    compact_placement,
    enforce_distinct_nodes,
    mro_placement,
    rotation_placement,
)
from thrifty.lazarus.placement_search import optimal_placement

log = logging.getLogger(__name__)

MRO_COUNTEREXAMPLE = ((2, 2, 2), 3, 2)  # the note's N=3, c=2, r=[2,2,2]


class _TooMany(Exception):
    pass


def brute_force(replicas, nodes, slots, min_distinct=1, cap=None, key=None):
    """Best ``(vector, placement)`` over all placements (by ``key(vector)``), and their count."""
    experts = len(replicas)
    pool = sorted(e for e in range(experts) for _ in range(min(replicas[e], slots)))
    multisets = sorted(set(itertools.combinations(pool, slots)))
    targets = [min(min_distinct, r, nodes) for r in replicas]
    key = key or tuple
    left, chosen = list(replicas), []
    best, count = None, 0

    def recurse(start):
        nonlocal best, count
        if len(chosen) == nodes:
            count += 1
            if cap is not None and count > cap:
                raise _TooMany
            masks = holder_masks(chosen, experts)
            if any(m.bit_count() < t for m, t in zip(masks, targets, strict=True)):
                return
            vector = naive_vector(masks, nodes)
            if best is None or key(vector) > key(best[0]):
                best = (vector, tuple(chosen))
            return
        for i in range(start, len(multisets)):
            node = multisets[i]
            for e in node:
                left[e] -= 1
            if min(left) >= 0:
                chosen.append(node)
                recurse(i)
                chosen.pop()
            for e in node:
                left[e] += 1

    recurse(0)
    return best, count


def holder_masks(nodes_content, experts):
    masks = [0] * experts
    for j, node in enumerate(nodes_content):
        for e in node:
            masks[e] |= 1 << j
    return masks


def naive_vector(masks, nodes):
    """Recoverable failure sets for k = 1..N-1: every failure set, checked expert by expert."""
    survivable = [0] * (nodes + 1)
    for failed in range(1 << nodes):
        if all(m & ~failed for m in masks):  # each expert has a holder outside the failed set
            survivable[failed.bit_count()] += 1
    return tuple(survivable[1:nodes])


def vector_of(placement: Placement):
    return naive_vector(holder_masks(placement.nodes, placement.num_experts), placement.num_nodes)


def random_instances(per_shape, seed, cap):
    """Random (r, N, c) for every N <= 5, c <= 3 with E > c, and their brute-force optimum.

    Instances whose brute force would visit more than ``cap`` placements are
    redrawn (at most 40 draws per shape) to keep the test fast.
    """
    rng = random.Random(seed)
    out = []
    for nodes, slots in itertools.product(range(2, 6), range(1, 4)):
        total = nodes * slots
        if total <= slots + 1:
            continue
        found = set()
        for _ in range(40):
            experts = rng.randint(slots + 1, min(total, slots + 5))
            cuts = sorted(rng.sample(range(1, total), experts - 1))
            replicas = tuple(sorted(b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)))
            if replicas in found:
                continue
            try:
                best, _ = brute_force(replicas, nodes, slots, min_distinct=2, cap=cap)
            except _TooMany:
                continue
            found.add(replicas)
            out.append((replicas, nodes, slots, best[0]))
            if len(found) == per_shape:
                break
    return out


INSTANCES = random_instances(per_shape=6, seed=8, cap=2000)


# --- constructions ------------------------------------------------------------------


def test_mro_counterexample_from_the_note():
    replicas, nodes, slots = MRO_COUNTEREXAMPLE
    plain = mro_placement(replicas, nodes, slots)
    assert plain.nodes == ((0, 1), (0, 1), (2, 2))  # both replicas of expert 3 on node 3
    rotation = rotation_placement(replicas, nodes, slots)
    assert rotation.nodes == ((0, 1), (0, 2), (1, 2))
    assert vector_of(plain) == (2, 0)  # a single failure loses expert 3 one time in 3
    assert vector_of(rotation) == (3, 0)
    assert sorted(place_experts(replicas, nodes, slots).nodes) == sorted(rotation.nodes)
    repaired = enforce_distinct_nodes(plain, 2)
    assert all(repaired.distinct_nodes(e) == 2 for e in range(3))


def test_mro_matches_the_paper_layout():
    # E <= c: nested node sets, S_1 ⊂ S_2 ⊂ ...
    nested = mro_placement([1, 3, 8], nodes=4, slots_per_node=3)
    assert [nested.holders(e) for e in range(3)] == [(0,), (0, 1, 2), (0, 1, 2, 3)]
    # E > c: groups {0,1} (rep r=2) on nodes 0-1, {2,3} (rep r=3) on nodes 2-4.
    grouped = mro_placement([2, 2, 3, 3], nodes=5, slots_per_node=2)
    assert grouped.nodes == ((0, 1), (0, 1), (2, 3), (2, 3), (2, 3))


def test_constructions_keep_replica_counts():
    replicas = allocate_replicas([5, 1, 9, 3, 3, 7, 2], nodes=6, slots_per_node=3).replicas
    for build in (mro_placement, rotation_placement, compact_placement):
        placement = build(replicas, 6, 3)
        assert placement.replicas == replicas
        assert placement.replica_matrix().sum() == 18
    rotation = rotation_placement(replicas, 6, 3)
    assert all(rotation.distinct_nodes(e) == min(r, 6) for e, r in enumerate(replicas))


@pytest.mark.parametrize(("replicas", "nodes", "slots"), [(r, n, c) for r, n, c, _ in INSTANCES])
def test_repair_reaches_distinct_targets_without_losing_any(replicas, nodes, slots):
    plain = mro_placement(replicas, nodes, slots)
    repaired = enforce_distinct_nodes(plain, 2)
    assert repaired.replicas == plain.replicas
    for e, r in enumerate(replicas):
        assert repaired.distinct_nodes(e) >= min(2, r, nodes)
        assert repaired.distinct_nodes(e) >= min(plain.distinct_nodes(e), min(2, r, nodes))


# --- optimality against brute force -----------------------------------------------


def test_thrifty_reaches_the_brute_force_optimum(record_property):
    """On every random small instance; also counts how often each construction falls short."""
    misses = {"mro": [], "mro_repaired": [], "rotation": [], "best_of_two": [], "local": []}
    for replicas, nodes, slots, optimum in [*INSTANCES, (*MRO_COUNTEREXAMPLE, (3, 0))]:
        result = search_placement(replicas, nodes, slots, min_distinct=2)
        assert result.proven_optimal
        assert vector_of(result.placement) == optimum, (replicas, nodes, slots)
        assert result.score == optimum
        plain = vector_of(mro_placement(replicas, nodes, slots))
        repaired = vector_of(enforce_distinct_nodes(mro_placement(replicas, nodes, slots), 2))
        rotation = vector_of(rotation_placement(replicas, nodes, slots))
        local = search_placement(replicas, nodes, slots, min_distinct=2, exact_max_nodes=0)
        for name, vector in [
            ("mro", plain),
            ("mro_repaired", repaired),
            ("rotation", rotation),
            ("best_of_two", max(repaired, rotation)),
            ("local", vector_of(local.placement)),
        ]:
            assert vector <= optimum
            if vector < optimum:
                misses[name].append((replicas, nodes, slots))
    total = len(INSTANCES) + 1
    summary = {name: f"{len(found)}/{total}" for name, found in misses.items()}
    record_property("placement_misses", summary)
    log.warning("instances where a construction misses the optimum: %s", summary)
    assert MRO_COUNTEREXAMPLE in misses["mro"]
    assert len(misses["mro"]) >= 1


@pytest.mark.parametrize("k", [1, 2, 3])
def test_single_failure_count_objective(k):
    """``failures=(k,)`` maximises P(k) alone: compare with brute-force max of P(k)."""
    checked = 0
    for replicas, nodes, slots, _ in INSTANCES[::3]:
        if k >= nodes:
            continue
        best_k = max_pk(replicas, nodes, slots, k)
        result = search_placement(replicas, nodes, slots, min_distinct=2, failures=(k,))
        assert vector_of(result.placement)[k - 1] == best_k
        checked += 1
    assert checked > 0


def max_pk(replicas, nodes, slots, k):
    (vector, _), _ = brute_force(replicas, nodes, slots, min_distinct=2, key=lambda v: v[k - 1])
    return vector[k - 1]


def test_distinct_constraint_is_free_when_every_expert_has_f_replicas():
    """With r_e >= f the constrained and unconstrained optima coincide (module docstring)."""
    checked = 0
    for replicas, nodes, slots, constrained in INSTANCES:
        if min(replicas) < 2 or nodes < 2:
            continue
        (unconstrained, _), _ = brute_force(replicas, nodes, slots, min_distinct=1)
        assert unconstrained == constrained
        checked += 1
    assert checked >= 3


def test_exact_search_budget_returns_best_found():
    result = optimal_placement([1, 1, 2, 2, 3, 3, 3], 5, 3, max_branches=3)
    assert not result.proven_optimal
    assert result.placement.replicas == (1, 1, 2, 2, 3, 3, 3)


def test_placement_is_deterministic():
    replicas = allocate_replicas([3, 9, 1, 4, 4, 8, 2, 7], nodes=8, slots_per_node=4).replicas
    a = search_placement(replicas, 8, 4)
    b = search_placement(list(replicas), 8, 4)
    assert a == b and a.proven_optimal
    assert a.score >= search_placement(replicas, 8, 4, max_evaluations=0).score


def test_large_cluster_placement():
    """1,000 nodes x 8 slots x 64 experts: valid, f distinct holders, and fast."""
    loads = [int(1000 / (1 + e) ** 1.2) + 1 for e in range(64)]
    allocation = allocate_replicas(loads, nodes=1000, slots_per_node=8, min_replicas=2)
    start = time.perf_counter()
    result = search_placement(allocation.replicas, 1000, 8, min_distinct=2)
    seconds = time.perf_counter() - start
    log.warning("placement of 1000 nodes x 8 slots x 64 experts took %.3f s", seconds)
    placement = result.placement
    assert placement.replicas == allocation.replicas
    assert all(placement.distinct_nodes(e) >= 2 for e in range(64))
    assert result.exact_score and result.score[0] == 1000  # any single failure is survivable
    assert seconds < 10  # < 1 s on an idle core; generous here for shared CI machines


@pytest.mark.parametrize(
    ("replicas", "nodes", "slots", "message"),
    [
        ((2, 2), 3, 2, "sum to 4 but 3 nodes x 2 slots = 6"),
        ((0, 6), 3, 2, "at least one replica"),
        ((), 3, 2, "empty"),
    ],
)
def test_bad_replica_counts(replicas, nodes, slots, message):
    with pytest.raises(ValueError, match=message):
        place_experts(replicas, nodes, slots)


def test_placement_validation():
    with pytest.raises(ValueError, match="node 1 has 1 slots"):
        Placement(((0, 1), (0,)), 2)
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        Placement(((0, 2),), 2)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(
    not os.environ.get("THRIFTY_LAZARUS_EXHAUSTIVE"),
    reason="set THRIFTY_LAZARUS_EXHAUSTIVE=1: all 304 cases N <= 5, c <= 3 (~15 min, 2 cores)",
)
def test_exhaustive_small_instances():
    """Every replica vector (as a partition of N*c into E > c parts) for N <= 5, c <= 3."""
    instances = misses = 0
    for nodes, slots in itertools.product(range(2, 6), range(1, 4)):
        for replicas in partitions(nodes * slots, slots + 1):
            (optimum, _), _ = brute_force(replicas, nodes, slots, min_distinct=2)
            result = search_placement(replicas, nodes, slots, min_distinct=2)
            assert result.score == optimum, (replicas, nodes, slots)
            instances += 1
            misses += vector_of(mro_placement(replicas, nodes, slots)) < optimum
        log.warning("exhaustive: N=%d c=%d done (%d instances so far)", nodes, slots, instances)
    log.warning("exhaustive: %d instances, plain MRO below the optimum on %d", instances, misses)


def partitions(total, min_parts, largest=None):
    """Non-increasing tuples of positive ints summing to ``total`` with >= ``min_parts`` parts."""
    largest = total if largest is None else largest
    if total == 0:
        if min_parts <= 0:
            yield ()
        return
    for first in range(min(total, largest), 0, -1):
        for rest in partitions(total - first, min_parts - 1, first):
            yield (first, *rest)
