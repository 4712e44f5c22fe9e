"""MergeComp's model-based search against brute force over every partition."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.comm import NetworkModel
from thrifty.comm.network import AlphaBeta
from thrifty.mergecomp import optimal_partition, partition_time, schedule
from thrifty.sync import Strategy
from thrifty.sync.profile import CompressionCost, Profile, TensorProfile

PRIMS = ("all_reduce", "all_gather", "all_to_all")


def _all_partitions(n: int):
    for cuts in itertools.product((False, True), repeat=n - 1):
        lengths, run = [], 1
        for cut in cuts:
            if cut:
                lengths.append(run)
                run = 1
            else:
                run += 1
        lengths.append(run)
        yield tuple(lengths)


def _profile(numels, gaps, strategy, encode_fixed, encode_per, decode_fixed) -> Profile:
    t, tensors = 0.0, []
    for i, (numel, gap) in enumerate(zip(numels, gaps, strict=True)):
        t += gap
        tensors.append(TensorProfile(f"t{i}", numel, "float32", t))
    sizes = [1, 10**7]
    cost = CompressionCost(
        sizes,
        [encode_fixed + encode_per * s for s in sizes],
        [decode_fixed + encode_per * s / 3 for s in sizes],
    )
    return Profile(
        tensors,
        forward=1e-3,
        backward=t + 1e-4,
        step=1e-4,
        world_size=2,
        costs={strategy.cost_key(): cost},
    )


STRATEGIES = [
    Strategy.make("topk", ratio=0.01),
    Strategy.make("fp16"),
    Strategy.make("efsignsgd"),
    Strategy.make(None),
    Strategy.make("qsgd", "all_to_all"),
]


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 10),
    which=st.integers(0, len(STRATEGIES) - 1),
    floor=st.floats(1e-5, 5e-3),
    bandwidth=st.floats(1e7, 1e10),
)
def test_dp_matches_brute_force(data, n, which, floor, bandwidth) -> None:
    strategy = STRATEGIES[which]
    numels = data.draw(st.lists(st.integers(1, 2_000_000), min_size=n, max_size=n))
    gaps = data.draw(st.lists(st.floats(0, 5e-3), min_size=n, max_size=n))
    enc = data.draw(st.floats(0, 2e-3))
    per = data.draw(st.floats(0, 1e-8))
    dec = data.draw(st.floats(0, 1e-3))
    profile = _profile(numels, gaps, strategy, enc, per, dec)
    net = NetworkModel("rand", {p: {2: AlphaBeta(floor / 2, 1 / bandwidth, floor)} for p in PRIMS})
    brute = min(partition_time(profile, strategy, net, p) for p in _all_partitions(n))
    best = optimal_partition(profile, strategy, net)
    assert best.predicted == pytest.approx(brute, rel=1e-12, abs=1e-15)
    assert partition_time(profile, strategy, net, best.lengths) == pytest.approx(best.predicted)


def test_brute_force_n12_on_a_profile_where_the_answer_is_in_between() -> None:
    strategy = STRATEGIES[0]
    numels = [1000, 20, 500_000, 30, 2_000_000, 10, 300_000, 40, 1_000_000, 64, 700_000, 5]
    profile = _profile(numels, [1e-3] * 12, strategy, 8e-4, 2e-9, 2e-4)
    net = NetworkModel("1gbit-ish", {p: {2: AlphaBeta(5e-4, 8e-9, 1e-3)} for p in PRIMS})
    times = {p: partition_time(profile, strategy, net, p) for p in _all_partitions(12)}
    brute = min(times.values())
    best = optimal_partition(profile, strategy, net)
    assert best.predicted == pytest.approx(brute, rel=1e-12)
    assert times[(1,) * 12] > brute and times[(12,)] > brute  # neither extreme is optimal


def test_search_of_300_tensors_gives_a_plan_that_covers_every_tensor() -> None:
    strategy = STRATEGIES[0]
    numels = [(i * 7919) % 600_000 + 10 for i in range(300)]
    profile = _profile(numels, [2e-4] * 300, strategy, 3e-4, 1e-9, 1e-4)
    net = NetworkModel("1gbit", {p: {2: AlphaBeta(5e-4, 8e-9, 1e-3)} for p in PRIMS})
    plan = schedule(profile, strategy, net)  # its speed is measured by the benchmark
    assert plan.names == profile.names
    assert 1 < len(plan.groups) < 300
