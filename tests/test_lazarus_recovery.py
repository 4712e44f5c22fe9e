"""Recovery probability: hand-computed cases, agreement of the exact methods, Monte Carlo bounds."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.lazarus import (
    Placement,
    allocate_replicas,
    recovery_estimate,
    recovery_probability,
)
from thrifty.lazarus.placement import mro_placement, rotation_placement
from thrifty.lazarus.recovery import (
    RecoveryScorer,
    hoeffding_half_width,
    hoeffding_samples,
    recoverable_counts,
)

EXACT = ("table", "enumerate", "inclusion_exclusion")


def test_hand_computed_two_blocks():
    # Experts 0,1 live only on nodes {0,1}; experts 2,3 only on nodes {2,3}.
    blocks = Placement.from_nodes([[0, 1], [0, 1], [2, 3], [2, 3]])
    expected = {0: 1, 1: 1, 2: Fraction(4, 6), 3: 0, 4: 0}  # k=2: fatal sets {0,1} and {2,3}
    for k, p in expected.items():
        for method in EXACT:
            assert recovery_estimate(blocks, k, method=method).probability == pytest.approx(p)


def test_hand_computed_counterexample():
    mro = mro_placement([2, 2, 2], 3, 2)  # nodes {0,1} {0,1} {2,2}
    rotation = rotation_placement([2, 2, 2], 3, 2)
    assert recovery_probability(mro, 1) == pytest.approx(2 / 3)
    assert recovery_probability(rotation, 1) == 1.0
    assert recovery_probability(rotation, 2) == 0.0  # one node holds only two of three experts


@pytest.mark.parametrize(("nodes", "r1"), [(5, 1), (6, 2), (8, 3)])
def test_nested_case_matches_the_paper_formula(nodes, r1):
    """E <= c: recovery iff one of expert 1's nodes survives: 1 - C(N - r1, R) / C(N, R)."""
    replicas = [r1, r1 + 1, 3 * nodes - 2 * r1 - 1]
    placement = mro_placement(replicas, nodes, 3)
    for failed in range(nodes + 1):
        survivors = nodes - failed
        expected = 1 - math.comb(nodes - r1, survivors) / math.comb(nodes, survivors)
        assert recovery_probability(placement, failed) == pytest.approx(expected)


def test_disjoint_groups_match_inclusion_exclusion_by_hand():
    # MRO with untruncated groups: recovery iff every group's block keeps a live node.
    replicas = allocate_replicas([1, 1, 2, 2, 4, 4], nodes=7, slots_per_node=2).replicas
    placement = mro_placement(replicas, 7, 2)
    blocks = [placement.holders(e) for e in sorted(range(6), key=lambda e: (replicas[e], e))[::2]]
    assert sum(len(b) for b in blocks) <= 7
    for failed in range(8):
        fatal = 0
        for size in range(1, len(blocks) + 1):
            for family in __import__("itertools").combinations(blocks, size):
                u = sum(len(b) for b in family)
                fatal += (-1) ** (size + 1) * math.comb(7 - u, failed - u) if u <= failed else 0
        expected = 1 - fatal / math.comb(7, failed)
        assert recovery_probability(placement, failed) == pytest.approx(expected)


@st.composite
def placements(draw, max_nodes=8):
    nodes = draw(st.integers(1, max_nodes))
    slots = draw(st.integers(1, 3))
    experts = draw(st.integers(1, nodes * slots))
    content = [
        draw(st.lists(st.integers(0, experts - 1), min_size=slots, max_size=slots))
        for _ in range(nodes)
    ]
    return Placement(tuple(tuple(node) for node in content), experts)


@settings(max_examples=60, deadline=None)
@given(placements())
def test_exact_methods_agree(placement):
    nodes = placement.num_nodes
    counts = recoverable_counts(placement, range(nodes + 1))
    for k in range(nodes + 1):
        values = {recovery_estimate(placement, k, method=m).probability for m in EXACT}
        assert max(values) - min(values) < 1e-12
        assert counts[k] == round(values.pop() * math.comb(nodes, k))


def test_unplaced_expert_is_never_recoverable():
    placement = Placement(((0, 0), (0, 0)), num_experts=2)
    for method in EXACT:
        assert recovery_estimate(placement, 0, method=method).probability == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monte_carlo_within_its_hoeffding_bound(seed):
    placement = mro_placement([2, 2, 3, 3, 4, 4, 5, 5, 6, 6], nodes=8, slots_per_node=5)
    for failed in (2, 4, 6):
        exact = recovery_estimate(placement, failed, method="table")
        estimate = recovery_estimate(
            placement, failed, method="monte_carlo", tolerance=0.01, confidence=0.999, seed=seed
        )
        assert not estimate.exact and estimate.samples == hoeffding_samples(0.01, 0.999)
        assert estimate.half_width <= 0.01
        assert abs(estimate.probability - exact.probability) <= estimate.half_width


def test_monte_carlo_on_a_large_cluster_matches_inclusion_exclusion():
    replicas = allocate_replicas([1] * 4 + [50] * 60, nodes=200, slots_per_node=4).replicas
    placement = rotation_placement(replicas, 200, 4)
    exact = recovery_estimate(placement, 30, method="inclusion_exclusion")
    assert exact.exact and exact.probability < 0.999
    estimate = recovery_estimate(placement, 30, method="monte_carlo", samples=20_000, seed=3)
    assert estimate.half_width == pytest.approx(hoeffding_half_width(20_000, 0.999))
    assert abs(estimate.probability - exact.probability) <= estimate.half_width


def test_auto_falls_back_to_monte_carlo_when_exact_is_too_costly():
    # 100 experts on disjoint node pairs (nodes 0..199), one more on nodes 200..299.
    nodes = [[e] for e in range(100) for _ in range(2)] + [[100]] * 100
    placement = Placement.from_nodes(nodes)
    failed = 20
    estimate = recovery_estimate(placement, failed, seed=1)
    assert estimate.method == "monte_carlo" and not estimate.exact
    # By hand: inclusion-exclusion over which of the 100 disjoint pairs are wiped out.
    fatal = sum(
        (-1) ** (j + 1) * math.comb(100, j) * math.comb(300 - 2 * j, failed - 2 * j)
        for j in range(1, failed // 2 + 1)
    )
    expected = 1 - Fraction(fatal, math.comb(300, failed))
    assert 0.3 < expected < 0.9
    assert abs(estimate.probability - float(expected)) <= estimate.half_width


def test_hoeffding_formulas():
    n = hoeffding_samples(0.01, 0.99)
    assert hoeffding_half_width(n, 0.99) <= 0.01 < hoeffding_half_width(n - 1, 0.99)
    assert 2 * math.exp(-2 * n * 0.01**2) <= 0.01


def test_scorer_ranks_like_probabilities():
    scorer = RecoveryScorer(3, (1, 2))
    mro = mro_placement([2, 2, 2], 3, 2)
    rotation = rotation_placement([2, 2, 2], 3, 2)
    assert scorer.score(rotation.holder_masks) == (3, 0)
    assert scorer.score(mro.holder_masks) == (2, 0)


def test_large_scorer_is_exact_by_inclusion_exclusion():
    replicas = allocate_replicas(list(np.arange(1, 65)), nodes=100, slots_per_node=8).replicas
    placement = mro_placement(replicas, 100, 8)
    scorer = RecoveryScorer(100, (1, 2, 3))
    score = scorer.score(placement.holder_masks)
    assert scorer.exact
    for k, count in zip((1, 2, 3), score, strict=True):
        assert count == round(
            recovery_probability(placement, k, method="enumerate") * math.comb(100, k)
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failed": 5}, "expected 0 <= failed <= 4"),
        ({"failed": 1, "method": "magic"}, "method='magic'"),
        ({"failed": 1, "method": "monte_carlo", "confidence": 1.0}, "confidence=1.0"),
        ({"failed": 1, "method": "monte_carlo", "tolerance": 0}, "tolerance=0"),
    ],
)
def test_bad_arguments(kwargs, message):
    placement = Placement.from_nodes([[0], [1], [0], [1]])
    with pytest.raises(ValueError, match=message):
        recovery_estimate(placement, **kwargs)


def test_scorer_keeps_one_scale_per_failure_count():
    pairs = [0b11 << (2 * i) for i in range(40)]  # 40 experts on disjoint node pairs
    few = [*pairs[:2], ((1 << 100) - 1) ^ 0b1111]  # + one expert on the other 96 nodes
    exact_first = RecoveryScorer(100, (2,), budget=3)
    assert exact_first.score(few) == (math.comb(100, 2) - 2,)
    assert exact_first.score(pairs) == (-1,)  # cannot be ranked exactly: ranks last
    assert exact_first.exact
    sampled_first = RecoveryScorer(100, (2,), budget=3, samples=4000)
    sampled = sampled_first.score(pairs)
    assert not sampled_first.exact
    expected = math.comb(100, 2) - 40
    assert abs(sampled[0] - expected) <= 0.05 * math.comb(100, 2)
    assert sampled_first.score(few)[0] >= sampled[0]  # same sample sets: consistent ranking
